"""Regenerates models/imagenet_labels.txt: the 1001 ImageNet class names of the
MobileNet V1 classifiers (index 0 "background", then the 1000 ILSVRC-2012
synsets in their usual sorted order, each as its WordNet lemmas).

The names come from the data files of the `timm` wheel (Apache-2.0), which pip
downloads without installing. Run: python scripts/make_imagenet_labels.py
"""

import pathlib
import subprocess
import sys
import tempfile
import zipfile

TIMM = "timm==1.0.31"
OUTPUT = pathlib.Path(__file__).resolve().parent.parent / "models" / "imagenet_labels.txt"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", TIMM, "-d", folder], check=True
        )
        (wheel,) = pathlib.Path(folder).glob("timm-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            synsets = archive.read("timm/data/_info/imagenet_synsets.txt").decode().split()
            lemma_lines = archive.read("timm/data/_info/imagenet_synset_to_lemma.txt").decode().splitlines()
    lemmas = dict(line.split("\t", 1) for line in lemma_lines if "\t" in line)
    names = ["background"] + [lemmas[synset] for synset in synsets]
    assert len(names) == 1001
    OUTPUT.write_text("\n".join(names) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
