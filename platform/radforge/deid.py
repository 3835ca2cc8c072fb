"""De-identification: what may leave the private side, keyed pseudonyms, report redaction.

The policy is an ALLOW-list: sample metadata is built only from the attributes named in
`SAFE_ATTRIBUTES` (geometry and acquisition parameters), never by copying a header and deleting
the known-bad tags. Anything not named here (names, IDs, dates, UIDs, institution, descriptions,
private tags, free text) cannot reach a shard.

Patient, study and series keys become HMAC-SHA256 pseudonyms under a secret that stays with the
operator (environment variable or secrets file). The same secret gives the same pseudonyms in every
run, so a patient's later studies land under the same key and in the same split; without the secret
nobody can link a pseudonym back to the UID (a plain hash of a UID could be brute-forced from
known UID roots).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Iterable

from radforge.config import DeidConfig
from radforge.errors import ConfigError

# A fixed, PUBLIC key for demos and tests. Pseudonyms made with it are not secret; the manifest
# records `deid.demo_key: true` so such shards are recognisable.
DEMO_KEY = b"radforge-demo-key--NOT-SECRET--do-not-use-for-real-data"

# Header attribute -> metadata key. Values pass `_clean` (short printable strings or numbers).
SAFE_ATTRIBUTES = {
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "KVP": "kvp",
    "ConvolutionKernel": "kernel",
    "SliceThickness": "slice_thickness_mm",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view_position",
    "PhotometricInterpretation": "source_photometric",
    "BitsStored": "source_bits_stored",
}
AGE_SEX_ATTRIBUTES = {"PatientAge": "age", "PatientSex": "sex"}

# Attributes whose values are searched for (and redacted) in report text.
IDENTIFYING_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "RequestingPhysician",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
)

REDACTED = "[REDACTED]"
_DATE_PATTERNS = [
    r"\b\d{4}-\d{1,2}-\d{1,2}\b",
    r"\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b",
    r"\b(19|20)\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])\b",
    r"\b(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.? \d{1,2},? \d{4}\b",
]
_DATE_RE = re.compile("|".join(f"(?:{p})" for p in _DATE_PATTERNS), re.IGNORECASE)


def load_secret(cfg: DeidConfig) -> bytes:
    """The pseudonym key: env var, else secrets file, else demo key if explicitly allowed."""
    value = os.environ.get(cfg.secret_env, "")
    if value:
        return value.encode()
    if cfg.secret_file:
        from radforge import storage

        try:
            data = storage.read_bytes(cfg.secret_file).strip()
        except FileNotFoundError:
            raise ConfigError(f"deid.secret_file not found: {cfg.secret_file}") from None
        if data:
            return data
        raise ConfigError(f"deid.secret_file is empty: {cfg.secret_file}")
    if cfg.demo_key:
        return DEMO_KEY
    raise ConfigError(
        f"no de-identification secret: set ${cfg.secret_env} (or deid.secret_file) to a long random "
        "string kept with the operator, or pass --demo for a public demo key"
    )


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms, namespaced by kind so a patient and a study never share a key."""

    def __init__(self, secret: bytes):
        self._key = secret

    def __call__(self, kind: str, value: str) -> str:
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        # 96 bits: collision-free at any plausible corpus size; short enough to read in a listing.
        return digest[:24]

    def split(self, patient_key: str, splits: dict[str, float]) -> str:
        """Deterministic split from the patient pseudonym: a patient's studies never straddle splits."""
        u = int(hmac.new(self._key, f"split\x00{patient_key}".encode(), hashlib.sha256).hexdigest()[:15], 16)
        x = u / float(16**15)
        acc = 0.0
        names = sorted(splits)  # order fixed independent of YAML order
        for name in names:
            acc += splits[name]
            if x < acc:
                return name
        return names[-1]

    @staticmethod
    def bucket(key: str, n: int) -> int:
        """Deterministic shard bucket for a sample key."""
        return int(hashlib.sha256(f"shard\x00{key}".encode()).hexdigest()[:15], 16) % max(1, n)


def safe_metadata(header: dict, cfg: DeidConfig) -> dict:
    """Allow-listed, cleaned acquisition metadata from a header mapping (attribute keyword -> value)."""
    out = {}
    allowed = dict(SAFE_ATTRIBUTES)
    if cfg.keep_age_sex:
        allowed.update(AGE_SEX_ATTRIBUTES)
    for attr, key in allowed.items():
        v = _clean(header.get(attr))
        if v is not None:
            out[key] = v
    return out


_TOKEN_OK = re.compile(r"^[A-Za-z0-9 _.,:;+\-/()\[\]]*$")


def _clean(value):
    """Numbers stay numbers; strings must be short and plain, else they are dropped (not escaped)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_clean(v) for v in value]
        return items if all(i is not None for i in items) and items else None
    s = str(value).strip()
    if len(s) > 64 or not _TOKEN_OK.match(s):
        return None
    try:
        return float(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else s
    except ValueError:
        return s


def identifying_terms(values: Iterable[str]) -> list[str]:
    """Strings to search for in free text: whole values, PN components, and date spellings."""
    terms: set[str] = set()
    for raw in values:
        if raw is None:
            continue
        s = str(raw).strip()
        if not s:
            continue
        terms.add(s)
        if "^" in s or " " in s:
            for part in re.split(r"[\^ ,]+", s):
                if len(part) >= 2:
                    terms.add(part)
            terms.add(" ".join(p for p in s.split("^") if p))
        if re.fullmatch(r"\d{8}", s):
            y, m, d = s[:4], s[4:6], s[6:]
            terms.update({f"{y}-{m}-{d}", f"{m}/{d}/{y}", f"{d}/{m}/{y}", f"{d}.{m}.{y}"})
    # Very short tokens ("A", "1") would shred normal words; they cannot identify anyone alone.
    return sorted((t for t in terms if len(t) >= 2), key=len, reverse=True)


def redact_report(text: str, terms: Iterable[str]) -> str:
    """Replace identifying header values (case-insensitive) and any date in the text."""
    out = text
    for term in terms:
        pattern = re.escape(term)
        if term[0].isalnum():
            pattern = r"(?<![A-Za-z0-9])" + pattern
        if term[-1].isalnum():
            pattern = pattern + r"(?![A-Za-z0-9])"
        out = re.sub(pattern, REDACTED, out, flags=re.IGNORECASE)
    return _DATE_RE.sub("[DATE]", out)
