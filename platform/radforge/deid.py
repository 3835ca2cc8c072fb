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
import math
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
DATE = "[DATE]"
_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?"
_DATE_PATTERNS = [
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b",  # 2024-01-31, 2024/01/31, 2024.01.31
    r"\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b",  # 01/31/2024, 31.01.2024, 1/31/24
    r"\b\d{1,2}-\d{1,2}-\d{4}\b",  # 01-31-2024 (not 1-2-24: too close to "10-12-15 mm" ranges)
    r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b",  # DICOM DA: 20240131
    rf"\b{_MONTH} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b",  # January 31, 2024 / Jan. 31 2024
    rf"\b\d{{1,2}}(?:st|nd|rd|th)? {_MONTH},? \d{{4}}\b",  # 31 January 2024
]
_DATE_RE = re.compile("|".join(f"(?:{p})" for p in _DATE_PATTERNS), re.IGNORECASE)


def load_secret(cfg: DeidConfig) -> bytes:
    """The pseudonym key: env var, else secrets file, else demo key if explicitly allowed.

    Surrounding whitespace is stripped from either source, so the same secret gives the same
    pseudonyms whether it arrives as a file or as an environment variable filled from that file
    (a Kubernetes secret exposed as env keeps the file's trailing newline).
    """
    value = os.environ.get(cfg.secret_env, "").strip()
    if value:
        return value.encode()
    if cfg.secret_file:
        from radforge import storage

        try:
            data = storage.read_bytes(cfg.secret_file).strip()
        except FileNotFoundError:
            raise ConfigError(f"deid.secret_file not found: {cfg.secret_file}") from None
        except OSError as e:  # a directory, no permission, an unreachable bucket...
            raise ConfigError(f"deid.secret_file cannot be read: {cfg.secret_file} ({type(e).__name__})") from None
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

    def __init__(self, secret: bytes | str):
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not key:
            raise ValueError("the pseudonym secret is empty")
        self._key = key

    def __call__(self, kind: str, value: str) -> str:
        digest = hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        # 96 bits: collision-free at any plausible corpus size; short enough to read in a listing.
        return digest[:24]

    def split(self, patient_key: str, splits: dict[str, float]) -> str:
        """Deterministic split from the patient pseudonym: a patient's studies never straddle splits.

        Patients are placed by a keyed uniform draw in [0, 1) against the cumulative fractions, in
        sorted split-name order, so the dict's order (YAML order) never changes an assignment.
        """
        u = int(hmac.new(self._key, f"split\x00{patient_key}".encode(), hashlib.sha256).hexdigest()[:15], 16)
        x = u / float(16**15)
        names = [n for n in sorted(splits) if splits[n] > 0]
        if not names:
            raise ValueError("splits need at least one positive fraction")
        acc = 0.0
        for name in names:
            acc += splits[name]
            if x < acc:
                return name
        # Only reached when the fractions sum to a hair under 1 in floating point: the last split
        # with a positive share takes the remainder, never a split configured with 0.
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


_TOKEN_OK = re.compile(r"[A-Za-z0-9 _.,:;+\-/()\[\]]*")


def _clean(value):
    """Numbers stay numbers; strings must be short and plain, else they are dropped (not escaped)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None  # NaN / inf are not valid JSON
    if isinstance(value, (list, tuple)):
        items = [_clean(v) for v in value]
        return items if items and all(i is not None for i in items) else None
    s = str(value).strip()
    if len(s) > 64 or not _TOKEN_OK.fullmatch(s):
        return None
    return float(s) if re.fullmatch(r"-?\d+(\.\d+)?", s) else s


def identifying_terms(values: Iterable[str]) -> list[str]:
    """Strings to search for in free text: whole values, their segments, name words, date spellings.

    - Every value is a term as a whole ("St Mary Hospital", "12 Elm Road, Springfield").
    - Values are cut at `^`, `,` and `=` (DICOM PN components and groups, "DOE, JOHN", address
      lines) and each segment is a term: "DOE^JOHN" gives "DOE" and "JOHN", so "John Doe",
      "DOE, JOHN" and "Dr. Doe" are all caught.
    - Person names (values with `^`, or with a comma and no digit) are split further into words
      and hyphen parts ("VAN DER BERG^ANNE-MARIE" gives "BERG", "ANNE", "MARIE"). Other multi-word
      values (institutions, addresses) are NOT split into words: "General Hospital" split word by
      word would redact "general" and "hospital" in every report, and they identify no one alone.
    - An 8-digit value that is a valid DICOM date (a birth date) adds its usual spellings:
      YYYY-MM-DD, YYYY/MM/DD, MM/DD/YYYY, DD/MM/YYYY, DD.MM.YYYY and the unpadded M/D/YYYY forms.
    - Terms shorter than 2 characters, and purely numeric terms of fewer than 4 digits, are dropped:
      "A" or a StudyID "12" identify no one alone, but would shred measurements ("12 mm").

    Longest first, so callers that match one at a time replace a full name before its parts.
    """
    values = tuple(values)
    # The slices of a series name the same patient: their terms are made once (str values only:
    # a key of other types could equal one whose str() differs, 1 == True).
    cacheable = all(type(v) is str for v in values)
    if cacheable and (hit := _TERMS.get(values)) is not None:
        return list(hit)
    terms = _terms(values)
    if cacheable:
        if len(_TERMS) >= _TERMS_MAX:
            _TERMS.clear()
        _TERMS[values] = tuple(terms)
    return terms


_TERMS: dict[tuple, tuple] = {}  # identifying_terms by its values (all str), up to _TERMS_MAX
_TERMS_MAX = 4096


def _terms(values: tuple) -> list[str]:
    terms: set[str] = set()
    for raw in values:
        if raw is None:
            continue
        s = " ".join(str(raw).split())  # collapse whitespace runs
        if not s:
            continue
        terms.add(s)
        segments = [seg.strip() for seg in re.split(r"[\^,=]+", s)]
        terms.update(segments)
        # A person name: DICOM PN ("DOE^JOHN") or "DOE, JOHN"; a comma with digits is an address.
        if "^" in s or ("," in s and not any(c.isdigit() for c in s)):
            terms.add(" ".join(c.strip() for c in s.split("^") if c.strip()))  # "DOE^JOHN" -> "DOE JOHN"
            for seg in segments:
                terms.update(re.split(r"[\s\-.']+", seg))
        if re.fullmatch(r"\d{8}", s):
            y, m, d = s[:4], s[4:6], s[6:]
            if 1 <= int(m) <= 12 and 1 <= int(d) <= 31:
                mu, du = str(int(m)), str(int(d))
                terms.update({
                    f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{m}/{d}/{y}", f"{d}/{m}/{y}", f"{d}.{m}.{y}",
                    f"{mu}/{du}/{y}", f"{du}/{mu}/{y}", f"{du}.{mu}.{y}",
                })
    kept = {t.strip() for t in terms}
    kept = {t for t in kept if len(t) >= 2 and not (t.isdigit() and len(t) < 4)}
    return sorted(kept, key=lambda t: (-len(t), t))


def redact_report(text: str, terms: Iterable[str]) -> str:
    """Replace identifying header values (any case) with [REDACTED], then any date with [DATE].

    Matching is by whole word: an edge of a term that is a letter may not touch another letter,
    an edge that is a digit may not touch another digit. So the name part "LI" leaves "clinical"
    and "LIVER" alone but still catches "Li," and "Li-Fraumeni"; the ID "12345678" is caught in
    "MRN12345678" but not inside "123456789". Whitespace inside a term matches any whitespace run,
    so a name wrapped across lines is still caught.

    Trade-off, chosen for privacy: a name part that is also an ordinary word is redacted wherever
    it appears as a word. For a patient "NO^EFFUSION", "No pleural effusion." becomes
    "[REDACTED] pleural [REDACTED]." Losing words of one report is a small, visible cost; a name
    left in a training corpus is a leak that cannot be taken back. (Terms shorter than 2
    characters are never produced by `identifying_terms`, so initials alone do not shred text.)

    All terms are matched in one pass, longest first at each position, so a full name is replaced
    as a unit and a replacement is never matched again.
    """
    unique = {" ".join(str(t).split()) for t in terms if t is not None}
    pieces = []
    for term in sorted((t for t in unique if t), key=len, reverse=True):
        body = r"\s+".join(re.escape(w) for w in term.split(" "))
        pieces.append(_edge(term[0], before=True) + body + _edge(term[-1], before=False))
    out = text
    if pieces:
        out = re.sub("|".join(f"(?:{p})" for p in pieces), REDACTED, out, flags=re.IGNORECASE)
    return _DATE_RE.sub(DATE, out)


def _edge(ch: str, *, before: bool) -> str:
    """Look-around that keeps a term edge from matching inside a longer word or number."""
    if ch.isdigit():
        cls = r"\d"
    elif ch.isalpha():
        cls = r"[^\W\d_]"  # any letter, Unicode included
    else:
        return ""
    return f"(?<!{cls})" if before else f"(?!{cls})"
