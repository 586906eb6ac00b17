"""ENTITIES.yaml: the entities of a new domain and where to look for their images.

::

    domain: aircraft
    entities:
      - name: Boeing 757
        aliases: [B757]                  # other spellings a URL manifest may use
        search: ["Boeing 757 aircraft"]  # Commons search terms; default: the name
        categories: ["Boeing 757"]       # Commons categories, without "Category:"
    commons:                             # the Wikimedia Commons adapter (optional)
      licenses: ["CC0", "CC BY-SA 4.0"]  # allow list, matched case-insensitively
      per_entity: 20                     # at most this many images per entity
    manifest: urls.csv                   # a URL list (optional), relative to this file
    fetch: {contact: "me@example.org"}   # how images are fetched (FetchSettings)
    concurrency: 16                      # URLs fetched at once, all hosts together

At least one of ``commons`` and ``manifest`` is required. Relative paths resolve against the
YAML file's folder. Errors name the file and the field.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from groundforge.sources.crawl.fetch import FetchSettings
from groundforge.yamlfile import describe_errors, read_yaml

COMMONS_API = "https://commons.wikimedia.org/w/api.php"
# Licences that allow reuse in a training set with attribution at most, as Commons spells them
# in LicenseShortName.
DEFAULT_LICENSES = (
    "CC0",
    "Public domain",
    "CC BY 1.0",
    "CC BY 2.0",
    "CC BY 2.5",
    "CC BY 3.0",
    "CC BY 4.0",
    "CC BY-SA 1.0",
    "CC BY-SA 2.0",
    "CC BY-SA 2.5",
    "CC BY-SA 3.0",
    "CC BY-SA 4.0",
)


class CrawlConfigError(ValueError):
    """An ENTITIES.yaml that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Candidate:
    """One image URL an adapter proposes for an entity, with what is known of its rights."""

    url: str
    entity: str
    license: str = ""
    author: str = ""
    source_page: str = ""
    title: str = ""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_blank(values: list[str]) -> list[str]:
    cleaned = [" ".join(v.split()) for v in values]
    if any(not v for v in cleaned):
        raise ValueError("entries must not be blank")
    return cleaned


class EntityConfig(_Strict):
    """One entity: its name, other spellings, and how to find it on Commons."""

    name: str = Field(min_length=1)
    aliases: list[str] = []
    search: list[str] = []
    categories: list[str] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("the name must not be blank")
        return value

    @field_validator("aliases", "search")
    @classmethod
    def _entries(cls, values: list[str]) -> list[str]:
        return _non_blank(values)

    @field_validator("categories")
    @classmethod
    def _categories(cls, values: list[str]) -> list[str]:
        return [re.sub(r"^category:\s*", "", v, flags=re.IGNORECASE) for v in _non_blank(values)]

    @property
    def search_terms(self) -> list[str]:
        """The Commons search terms: ``search``, or the name when none are given."""
        return self.search or [self.name]


class CommonsConfig(_Strict):
    """The Wikimedia Commons adapter (MediaWiki Action API)."""

    api_url: str = COMMONS_API
    licenses: list[str] = Field(list(DEFAULT_LICENSES), min_length=1)
    per_entity: int = Field(20, ge=1)


class CrawlConfig(_Strict):
    """A whole ENTITIES.yaml; ``manifest`` is an absolute path once loaded from a file."""

    domain: str = Field(min_length=1)
    entities: list[EntityConfig] = Field(min_length=1)
    commons: CommonsConfig | None = None
    manifest: str | None = None
    fetch: FetchSettings = FetchSettings()
    concurrency: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> CrawlConfig:
        if self.commons is None and self.manifest is None:
            raise ValueError("give at least one image source: `commons:` or `manifest:`")
        owners: dict[str, str] = {}
        for entity in self.entities:
            for key in dict.fromkeys(n.casefold() for n in [entity.name, *entity.aliases]):
                if key in owners and owners[key] != entity.name:
                    raise ValueError(
                        f"entities: {key!r} names both {owners[key]!r} and {entity.name!r}"
                    )
                if key in owners:
                    raise ValueError(f"entities: {entity.name!r} is listed twice")
                owners[key] = entity.name
        # Wikimedia blocks clients that do not say who runs them.
        if self.commons is not None and not (self.fetch.contact or self.fetch.user_agent):
            raise ValueError(
                "fetch.contact: Wikimedia requires a way to reach the operator of a crawler; "
                "give an e-mail address or a web page (or a full fetch.user_agent)"
            )
        return self

    def entity_names(self) -> dict[str, str]:
        """Every name and alias, case-folded, mapped to its entity's name."""
        return {
            n.casefold(): entity.name
            for entity in self.entities
            for n in [entity.name, *entity.aliases]
        }

    def folders(self) -> dict[str, str]:
        """A distinct, filesystem-safe folder name for every entity."""
        slugs = {entity.name: entity_slug(entity.name) for entity in self.entities}
        counts: dict[str, int] = {}
        for slug in slugs.values():
            counts[slug] = counts.get(slug, 0) + 1
        return {
            name: slug if counts[slug] == 1 else f"{slug}_{_short_hash(name)}"
            for name, slug in slugs.items()
        }


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def entity_slug(name: str) -> str:
    """A lower-case ASCII folder name for an entity (``"Boeing 757"`` -> ``"boeing_757"``).

    Underscores separate words so that the image-folder source's ``entity_from: parent`` reads
    the name back; names with no ASCII letters or digits get a hash.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")[:80].rstrip("_")
    return slug or f"entity_{_short_hash(name)}"


def parse_crawl_config(data: object, base: Path, origin: str = "<entities>") -> CrawlConfig:
    """Validate ENTITIES.yaml given as a dict; ``manifest`` resolves against ``base``."""
    if not isinstance(data, dict):
        raise CrawlConfigError(f"{origin}: expected a YAML mapping, got {type(data).__name__}")
    if isinstance(data.get("manifest"), str):
        manifest = Path(data["manifest"]).expanduser()
        data = {**data, "manifest": str((base / manifest).resolve())}
    try:
        return CrawlConfig.model_validate(data)
    except ValidationError as err:
        raise CrawlConfigError(f"{origin}: invalid entities file\n{describe_errors(err)}") from None


def load_crawl_config(path: str | Path) -> CrawlConfig:
    """Read and validate an ENTITIES.yaml file."""
    path = Path(path)
    data = read_yaml(path, CrawlConfigError, "entities file")
    return parse_crawl_config(data, path.parent, str(path))
