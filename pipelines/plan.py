"""What a run writes: the shards already committed, set against the inputs as they
are listed now.

A committed shard's marker records its inputs, each with its size and stamp (see
pipelines/shards.py). Against the listing, each committed shard is

  kept       every input listed and unchanged: left alone, not even read;
  rewritten  some inputs deleted or changed: a new shard of those still listed,
             whose unchanged inputs' rows are copied from the old shard's files
             and whose changed ones are embedded again; the old shard's files go
             once the new one is committed;
  retracted  every input deleted: its files go.

Inputs that no committed shard holds (new files, and those of shards a killed run
never committed) are cut into new shards. So a shard's boundaries never depend on
its neighbours: a new file that sorts first joins a new shard and moves nothing.
(Cutting the whole sorted listing anew each run, as imgembed did before, shifted
every later shard when one file was added, and so re-embedded all of them.)

A rewritten shard's marker names the shard it replaces. A run killed after that
marker was written and before the old files were deleted leaves both; the next
plan finds the old one ``superseded`` and deletes it first.
"""

from __future__ import annotations

import dataclasses

from imgembed.common import storage
from imgembed.common.embedding_files import embeddings_glob, errors_glob, key_of, markers_glob
from imgembed.pipelines.shards import FILES, InputFile, InputShard, cut_into_shards, settings_of, shard_key


@dataclasses.dataclass
class Changes:
    """The inputs, against what the output held before the run."""

    new: int = 0  # in no committed shard
    changed: int = 0  # their stamp changed: embedded again
    deleted: int = 0  # in a committed shard, no longer listed: their rows retracted


@dataclasses.dataclass
class RunPlan:
    todo: dict[str, InputShard]  # shards to write, new or rewritten, by key
    kept: dict[str, dict]  # markers of committed shards left as they are, by key
    retracted: list[str]  # keys of committed shards whose every input was deleted
    superseded: list[str]  # keys of shards replaced by a committed shard, still on disk
    changes: Changes

    @property
    def rewritten(self) -> int:
        return sum(1 for shard in self.todo.values() if shard.rewrites)


def plan_run(
    committed: dict[str, dict], listing: dict[str, InputFile], files_per_shard: int, settings: str
) -> RunPlan:
    """The shards a run writes, from the markers of the shards committed (by key) and
    the inputs listed now (by path). A pure function of the two."""
    replaced = {old for marker in committed.values() for old in marker.get("replaces", ())}
    superseded = sorted(replaced & committed.keys())
    todo: dict[str, InputShard] = {}
    kept: dict[str, dict] = {}
    retracted: list[str] = []
    changes = Changes()
    claimed: set[str] = set()
    for key in sorted(committed.keys() - replaced):
        marker = committed[key]
        shard = InputShard.from_inputs(marker["shard"])
        unchanged, changed, deleted = [], [], 0
        for recorded in shard.files():
            now = listing.get(recorded.path)
            if now is None or now.kind != recorded.kind or recorded.path in claimed:
                deleted += now is None
                continue
            claimed.add(now.path)
            (unchanged if now == recorded else changed).append(now)
        changes.changed += len(changed)
        changes.deleted += deleted
        if len(unchanged) == len(shard.paths):
            kept[key] = marker
        elif not unchanged and not changed:
            retracted.append(key)
        else:
            reused = [file.path for file in unchanged] if shard.kind == FILES else []
            files = sorted(unchanged + changed, key=lambda file: file.path)
            rewritten = InputShard.of(shard.kind, files, rewrites=key, reused=reused)
            todo[shard_key(rewritten, settings)] = rewritten
    unclaimed = [file for path, file in listing.items() if path not in claimed]
    changes.new = len(unclaimed)
    for shard in cut_into_shards(unclaimed, files_per_shard):
        todo[shard_key(shard, settings)] = shard
    return RunPlan(todo, kept, retracted, superseded, changes)


@dataclasses.dataclass
class OutputState:
    """What an output folder holds, from listings (one per folder) and the markers of
    the run's settings."""

    committed: dict[str, dict]  # markers of this run's settings, by key
    foreign: list[str]  # markers of shards made with other settings (model, preprocessing...)
    files_by_key: dict[str, list[str]]  # this run's settings' embeddings and errors files

    def orphans(self) -> list[str]:
        """Files of no committed shard (a killed run wrote them, not their marker):
        a planned shard of the same key writes them again."""
        return [
            path for key, paths in self.files_by_key.items() if key not in self.committed for path in paths
        ]


def output_state(output_dir: str, model_names: list[str], settings: str) -> OutputState:
    patterns = [markers_glob(output_dir), errors_glob(output_dir)]
    patterns += [embeddings_glob(storage.join(output_dir, name)) for name in model_names]
    markers, *data = [sorted(found) for found in storage.match_sizes(patterns)]
    ours = [path for path in markers if settings_of(key_of(path)) == settings]
    foreign = [path for path in markers if settings_of(key_of(path)) != settings]
    committed = dict(zip(map(key_of, ours), storage.read_many(ours, storage.read_json), strict=True))
    files_by_key: dict[str, list[str]] = {}
    for paths in data:
        for path in paths:
            if settings_of(key_of(path)) == settings:
                files_by_key.setdefault(key_of(path), []).append(path)
    return OutputState(committed, foreign, files_by_key)
