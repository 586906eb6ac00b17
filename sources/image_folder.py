"""Images in a folder tree; the entity name comes from each file's stem or its folder.

The folder is a local path or a bucket prefix (``gs://``, ``s3://``: any Beam ``FileSystems``
path). It is listed on the driver (:meth:`ImageFolderSource.partitions`), in sorted order of
relative posix paths, and read on the workers (:meth:`ImageFolderSource.items`). Hidden files and
folders (names starting with ``.``) are skipped. On a local disk anything whose *name* has an
image extension is listed, even a directory or a dangling symlink, so that
:func:`groundforge.sources.read.read_item` rejects it with a reason instead of it vanishing, and
symlinked folders are followed (a link back to an enclosing folder is not); a bucket has neither,
so there every object under the prefix is listed through ``FileSystems.match``. A symlink (of a
file, or of a folder on its path) that leads out of the root is listed but refused as
``outside_source``, unless ``follow_outside_links`` is set: a folder handed to the pipeline
should not make it read whatever its links point at.

Per-file overrides: ``metadata.jsonl`` at the root of the folder, one JSON object per line::

    {"path": "africa/chad.png", "entity": "Chad", "license": "CC0-1.0", "url": "https://..."}
    {"sha256": "9f86d08...", "author": "A. Person", "domain": "flag"}

- ``path`` (relative posix path under the root) or ``sha256`` (hex digest of the file's bytes)
  says which file the line is about; a line with both is matched by ``path``.
- ``entity``, ``license``, ``author``, ``url``, ``domain`` replace what the source would give
  that file (``entity`` is used as written, the naming rule does not touch it). ``null`` means
  "no override"; other keys are ignored, so a crawler may keep its own fields there.
- When a file matches both a ``sha256`` line and a ``path`` line, the ``path`` line wins; when
  two lines name the same key, the later one wins. Lines that match no listed file do nothing.

Hashing costs a read of every file, so files are only hashed (on the workers, and the bytes are
then passed on so nothing is read twice) when the metadata has at least one ``sha256`` line.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from groundforge.jsonl import json_objects
from groundforge.outputs.files import is_local
from groundforge.outputs.files import list_files as match_files
from groundforge.schemas.records import SourceItem, sha256_hex
from groundforge.sources.read import read_location

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
OVERRIDABLE = ("entity", "license", "author", "url", "domain")

_ENTITY_FROM = ("stem", "parent", "none")
_CASES = ("title", "lower", "keep")
# str.title() also capitalises after apostrophes and digits ("Don'T", "1St"); words here start
# only at the beginning or after whitespace or a hyphen ("Guinea-Bissau").
_WORD_START = re.compile(r"(^|[\s-])(\w)")


@dataclass(frozen=True)
class NamingRule:
    """How a file's path becomes an entity name.

    The raw name is the file's stem (``entity_from="stem"``) or its folder's name (``"parent"``;
    empty for a file directly in the root); ``"none"`` gives no entity. Then, in order:
    ``strip_pattern`` (a regex) is removed from it; if the result is a key of ``rename`` its value
    is the name, as written; otherwise each character of ``separators`` becomes a space, runs of
    spaces collapse, and ``case`` applies (``"title"``: each word's first letter upper-cased and
    the rest lower-cased, words split at spaces and hyphens; ``"lower"``; ``"keep"``).

    >>> rule = NamingRule(strip_pattern=r"_\\d+$", rename={"capeverde": "Cape Verde"})
    >>> rule.entity(PurePath("africa/burkina_faso_01.png"))
    'Burkina Faso'
    >>> rule.entity(PurePath("africa/capeverde.png"))
    'Cape Verde'
    >>> NamingRule(entity_from="parent").entity(PurePath("/data/sea_birds/x.jpg"), "/data")
    'Sea Birds'
    """

    entity_from: str = "stem"
    separators: str = "_"
    case: str = "title"
    strip_pattern: str | None = None
    rename: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.entity_from not in _ENTITY_FROM:
            raise ValueError(f"entity_from must be one of {_ENTITY_FROM}, got {self.entity_from!r}")
        if self.case not in _CASES:
            raise ValueError(f"case must be one of {_CASES}, got {self.case!r}")
        if self.strip_pattern is not None:
            try:
                re.compile(self.strip_pattern)
            except re.error as e:
                raise ValueError(f"strip_pattern {self.strip_pattern!r} is not a regex: {e}") from e

    def raw_name(self, path: PurePath | str, root: PurePath | str = "") -> str:
        """The part of the path the name is made from, before any rule applies."""
        path = PurePath(path)
        if root and path.is_absolute():
            try:
                path = path.relative_to(root)
            except ValueError:
                pass
        if self.entity_from == "stem":
            return path.stem
        if self.entity_from == "parent":
            return path.parent.name if len(path.parts) > 1 else ""
        return ""

    def entity(self, path: PurePath | str, root: PurePath | str = "") -> str:
        """The entity name of the file at ``path`` (absolute under ``root``, or relative to it)."""
        name = self.raw_name(path, root)
        if self.strip_pattern:
            name = re.sub(self.strip_pattern, "", name)
        if name in self.rename:
            return self.rename[name]
        for sep in self.separators:
            name = name.replace(sep, " ")
        name = " ".join(name.split())
        if self.case == "lower":
            return name.lower()
        if self.case == "title":
            return _WORD_START.sub(lambda m: m.group(1) + m.group(2).upper(), name.lower())
        return name


@dataclass
class Metadata:
    """Parsed ``metadata.jsonl``: overrides by relative path and by sha256."""

    by_path: dict[str, dict[str, str]] = field(default_factory=dict)
    by_sha256: dict[str, dict[str, str]] = field(default_factory=dict)

    def lookup(self, rel_path: str, sha256: str | None) -> dict[str, str]:
        found = dict(self.by_sha256.get(sha256, {})) if sha256 else {}
        found.update(self.by_path.get(rel_path, {}))
        return found


def load_metadata(path: str) -> Metadata:
    """Read a ``metadata.jsonl`` file (any ``FileSystems`` path; format in the module
    docstring); errors name the line."""
    meta = Metadata()
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    with io.TextIOWrapper(raw, encoding="utf-8") as fh:
        for lineno, entry in json_objects(fh, path):
            where = f"{path}, line {lineno}"
            overrides = {}
            for key in OVERRIDABLE:
                value = entry.get(key)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
                overrides[key] = value
            if isinstance(entry.get("path"), str) and entry["path"]:
                rel = PurePosixPath(entry["path"])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(
                        f"{where}: path {entry['path']!r} must be relative to the folder "
                        "holding metadata.jsonl, without '..'"
                    )
                meta.by_path.setdefault(rel.as_posix(), {}).update(overrides)
            elif isinstance(entry.get("sha256"), str) and entry["sha256"]:
                meta.by_sha256.setdefault(entry["sha256"].lower(), {}).update(overrides)
            else:
                raise ValueError(f'{where}: give the file as "path" or "sha256"')
    return meta


@dataclass
class ImageFolderSource:
    """Every image file under ``root`` (a local folder or a bucket prefix), as
    :class:`SourceItem` s with ``item_id`` = the relative posix path and ``location`` = the
    absolute path or URI.

    ``exclude`` holds glob patterns (``fnmatch``) matched against each relative path; matching
    files are not listed at all (they are not inputs, so they are not rejections either).

    >>> src = ImageFolderSource("examples/data/flags", "flag", NamingRule())  # doctest: +SKIP
    >>> items = [i for part in src.partitions() for i in src.items(part)]  # doctest: +SKIP
    """

    root: str
    domain: str
    naming: NamingRule = field(default_factory=NamingRule)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    exclude: tuple[str, ...] = ()
    recursive: bool = True
    chunk_size: int = 256
    license: str = ""
    author: str = ""
    source: str = "image_folder"
    follow_outside_links: bool = False
    # Parsed metadata.jsonl, loaded once per process; never pickled.
    _metadata: Metadata | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        root = os.fspath(self.root)
        # Absolute now, on the driver, so workers started in another directory find the files.
        self.root = os.path.abspath(root) if is_local(root) else root.rstrip("/")
        self.extensions = tuple(
            e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions
        )
        self.exclude = tuple(self.exclude)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_metadata": None}

    def _check_root(self) -> None:
        if not is_local(self.root):
            return
        if not os.path.exists(self.root):
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; check the source path (a recipe's "
                "relative path is resolved against the recipe file's folder)"
            )
        if not os.path.isdir(self.root):
            raise NotADirectoryError(
                f"image folder {self.root} is a file; point the source path at the folder "
                "holding the images"
            )

    def metadata(self) -> Metadata:
        """The folder's ``metadata.jsonl`` overrides (empty when there is none)."""
        if self._metadata is None:
            path = FileSystems.join(self.root, METADATA_FILE)
            found = os.path.isfile(path) if is_local(path) else FileSystems.exists(path)
            self._metadata = load_metadata(path) if found else Metadata()
        return self._metadata

    def _named_like_image(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.extensions

    def list_files(self) -> list[str]:
        """Relative posix paths of every entry named like an image, sorted."""
        self._check_root()
        if not is_local(self.root):
            return sorted(rel for rel in self._list_bucket() if not self.excluded(rel))
        found: list[str] = []

        def walk(folder: str, prefix: str, ancestors: frozenset[tuple[int, int]]) -> None:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            # Only a folder that is its own ancestor is a loop; one reached by two routes is
            # listed under both, whatever order the filesystem returns entries in.
            if key in ancestors:
                return
            ancestors = ancestors | {key}
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    rel = prefix + entry.name
                    if self._named_like_image(entry.name):
                        found.append(rel)
                    if self.recursive and entry.is_dir():
                        walk(entry.path, rel + "/", ancestors)

        walk(self.root, "", frozenset())
        return sorted(rel for rel in found if not self.excluded(rel))

    def _list_bucket(self) -> list[str]:
        prefix = self.root + "/"
        paths = [p for p in match_files(FileSystems.join(self.root, "**")) if p.startswith(prefix)]
        if not paths:
            raise FileNotFoundError(
                f"image folder {self.root} holds no files; check the source path and the "
                "filesystem's pipeline options (credentials, endpoint)"
            )
        found = []
        for path in paths:
            parts = path[len(prefix) :].split("/")
            hidden = any(part.startswith(".") for part in parts)
            if hidden or (len(parts) > 1 and not self.recursive):
                continue
            if self._named_like_image(parts[-1]):
                found.append("/".join(parts))
        return found

    def excluded(self, rel: str) -> bool:
        """True when the relative path matches one of the ``exclude`` patterns."""
        return any(fnmatch.fnmatchcase(rel, pattern) for pattern in self.exclude)

    def partitions(self) -> list[tuple[str, ...]]:
        """The listed files in chunks of ``chunk_size`` relative paths (run on the driver)."""
        files = self.list_files()
        self.metadata()  # a malformed metadata.jsonl fails here, before any worker starts
        return [
            tuple(files[i : i + self.chunk_size]) for i in range(0, len(files), self.chunk_size)
        ]

    def items(self, chunk: tuple[str, ...]) -> Iterator[SourceItem]:
        """One :class:`SourceItem` per relative path of a chunk from :meth:`partitions`."""
        meta = self.metadata()
        local = is_local(self.root)
        for rel in chunk:
            location = (
                os.path.join(self.root, *rel.split("/"))
                if local
                else FileSystems.join(self.root, rel)
            )
            data = digest = None
            outside = local and not self.follow_outside_links and _leaves(location, self.root)
            if meta.by_sha256 and not outside:
                data = _read_or_none(location)
                digest = sha256_hex(data) if data is not None else None
            fields = {
                "entity": self.naming.entity(PurePosixPath(rel)),
                "license": self.license,
                "author": self.author,
                "url": "",
                "domain": self.domain,
            }
            fields.update(meta.lookup(rel, digest))
            if outside:
                fields["error"] = (
                    f"{location} is a link to {os.path.realpath(location)}, outside the source "
                    f"folder {self.root}; set source.follow_outside_links: true to read it"
                )
                fields["reason"] = "outside_source"
            yield SourceItem(
                item_id=rel, location=location, source=self.source, data=data, **fields
            )


def _leaves(location: str, root: str) -> bool:
    """Whether a local path resolves (through its links) to somewhere outside ``root``."""
    real, top = os.path.realpath(location), os.path.realpath(root)
    return os.path.commonpath([real, top]) != top


def _read_or_none(location: str) -> bytes | None:
    # A file that cannot be read here is left for read_item, which says why.
    try:
        return read_location(location)
    except Exception:
        return None
