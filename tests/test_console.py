"""What the command line prints: our own lines only, unless -v asks for the rest, and
progress that never goes quiet for long."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

from fixtures.images import photo_like
from imgembed import console
from imgembed.common import progress

BIN = os.path.dirname(sys.executable)
# What a run prints besides our "imgembed: ..." lines: the summary of the report.
SUMMARY_STARTS = ("Read ", "Embedded ", "  inputs ", "  embeddings: ", "Errors: ")


def test_a_run_prints_only_our_lines_and_verbose_brings_the_libraries_back(tiny_model_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(12):
        photo_like(seed, 90, 70).save(folder / f"{seed:02d}.jpg")
    # A fresh cache: the model is converted and checked in TensorFlow, in a child process.
    env = os.environ | {"IMGEMBED_CACHE_DIR": str(tmp_path / "cache")}
    command = [os.path.join(BIN, "imgembed"), "embed", f"--input={folder}", f"--model={tiny_model_dir}"]
    quiet = subprocess.run(
        command + [f"--output={tmp_path}/quiet"], capture_output=True, text=True, env=env, timeout=600
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = (quiet.stdout + quiet.stderr).splitlines()
    strangers = [line for line in lines if not line.startswith(("imgembed:", *SUMMARY_STARTS))]
    assert not strangers, strangers
    assert "inputs 12 = embedded 12 + errors 0" in quiet.stdout

    env["IMGEMBED_CACHE_DIR"] = str(tmp_path / "cache2")
    verbose = subprocess.run(
        command + [f"--output={tmp_path}/verbose", "-v"], capture_output=True, text=True, env=env, timeout=600
    )
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "apache_beam" in verbose.stderr  # Beam's loggers
    assert "] " in verbose.stderr and "I0000" in verbose.stderr  # absl's native lines (TensorFlow)


def test_piped_progress_prints_a_line_at_least_every_interval_and_stays_quiet_for_short_phases():
    stream = io.StringIO()
    display = console.LineDisplay(stream, every=0.2)
    progress.set_display(display)
    try:
        with progress.phase("index: add", 100, "vectors") as bar:
            for _ in range(10):
                time.sleep(0.1)
                bar.advance(10)
        with progress.phase("index: tune", 3, "settings"):
            pass
    finally:
        progress.set_display(progress.Display())
    lines = stream.getvalue().splitlines()
    assert len([line for line in lines if line.startswith("imgembed: index: add: ")]) >= 3
    assert any("/100 vectors" in line and "vectors/s" in line for line in lines)
    assert not [line for line in lines if "tune" in line]  # done in well under SHORT_PHASE_SECONDS


def test_bad_environments_get_one_line_and_a_non_zero_exit(tiny_model_dir, tmp_path):
    import shlex

    import pytest

    from tests.beam_workers import can_isolate

    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        photo_like(seed, 90, 70).save(folder / f"{seed:02d}.jpg")
    (tmp_path / "a_file").write_text("not a folder")
    imgembed = os.path.join(BIN, "imgembed")
    embed = [imgembed, "embed", f"--input={folder}", f"--model={tiny_model_dir}", "--runner=DirectRunner"]
    runs = {
        "output is a file": embed + [f"--output={tmp_path / 'a_file'}"],
        "port out of range": [imgembed, "serve", "--index", str(tmp_path), "--port", "99999"],
    }
    if can_isolate() is None:  # root writes through permissions: a read-only mount stops it
        read_only = f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(tmp_path / 'ro'))} && exec "
        (tmp_path / "ro").mkdir()
        for name, command in {
            "embed into a read-only folder": embed + [f"--output={tmp_path / 'ro' / 'out'}"],
            "index into a read-only folder": [imgembed, "index", "--embeddings", str(tmp_path / "e")]
            + ["--output", str(tmp_path / "ro" / "index")],
        }.items():
            runs[name] = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                read_only + shlex.join(command),
            ]
        from fixtures.synthetic_vectors import write_synthetic_embeddings

        write_synthetic_embeddings(str(tmp_path / "e"), count=200, dim=8, files=1)
    elif os.environ.get("IMGEMBED_REQUIRE_TOOLS"):
        pytest.fail(f"cannot make a read-only mount: {can_isolate()}")
    for name, command in runs.items():
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("imgembed "), (
            name,
            done.stderr,
        )
