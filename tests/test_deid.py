"""radforge.deid: where the key comes from, keyed pseudonyms and splits, the metadata allow-list,
and report redaction (what is caught, and which ordinary words survive)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from radforge import deid
from radforge.config import DeidConfig
from radforge.deid import REDACTED, Pseudonymizer
from radforge.errors import ConfigError

ENV = "RADFORGE_TEST_DEID_SECRET"
DATE = "[DATE]"


@pytest.fixture
def cfg(monkeypatch) -> DeidConfig:
    monkeypatch.delenv(ENV, raising=False)
    return DeidConfig(secret_env=ENV)


# ----------------------------------------------------------------------------- the secret


def test_secret_from_env_wins_over_file_and_demo(cfg, monkeypatch, tmp_path):
    f = tmp_path / "secret"
    f.write_text("from-file")
    monkeypatch.setenv(ENV, "from-env")
    both = DeidConfig(secret_env=ENV, secret_file=str(f), demo_key=True)
    assert deid.load_secret(both) == b"from-env"


def test_secret_from_file_when_env_is_unset_or_blank(cfg, monkeypatch, tmp_path):
    f = tmp_path / "secret"
    f.write_text("  from-file\n")
    c = DeidConfig(secret_env=ENV, secret_file=str(f), demo_key=True)
    assert deid.load_secret(c) == b"from-file"  # stripped; the file beats the demo key
    monkeypatch.setenv(ENV, "  \n")
    assert deid.load_secret(c) == b"from-file"  # a blank variable counts as unset


def test_env_and_file_holding_the_same_secret_give_the_same_key(cfg, monkeypatch, tmp_path):
    f = tmp_path / "secret"
    f.write_text("shared-secret\n")
    from_file = deid.load_secret(DeidConfig(secret_env=ENV, secret_file=str(f)))
    monkeypatch.setenv(ENV, "shared-secret\n")  # e.g. a Kubernetes secret exposed as env
    assert deid.load_secret(cfg) == from_file


def test_demo_key_only_when_asked(cfg):
    assert deid.load_secret(DeidConfig(secret_env=ENV, demo_key=True)) == deid.DEMO_KEY
    with pytest.raises(ConfigError) as info:
        deid.load_secret(cfg)
    msg = str(info.value)
    assert f"${ENV}" in msg and "--demo" in msg and "\n" not in msg


def test_secret_file_problems_are_config_errors(cfg, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        deid.load_secret(DeidConfig(secret_env=ENV, secret_file=str(tmp_path / "missing"), demo_key=True))
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="empty"):
        deid.load_secret(DeidConfig(secret_env=ENV, secret_file=str(empty), demo_key=True))
    with pytest.raises(ConfigError, match="cannot be read"):
        deid.load_secret(DeidConfig(secret_env=ENV, secret_file=str(tmp_path)))  # a directory


def test_secret_messages_never_contain_the_secret(cfg, tmp_path):
    """A secret file path is named; its content never is."""
    f = tmp_path / "secret"
    f.write_text("")
    with pytest.raises(ConfigError) as info:
        deid.load_secret(DeidConfig(secret_env=ENV, secret_file=str(f)))
    assert str(f) in str(info.value)


# ----------------------------------------------------------------------------- pseudonyms


def test_pseudonyms_are_deterministic_keyed_and_namespaced():
    a1, a2, b = Pseudonymizer(b"key-a" * 8), Pseudonymizer(b"key-a" * 8), Pseudonymizer(b"key-b" * 8)
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    p = a1("patient", uid)
    assert re.fullmatch(r"[0-9a-f]{24}", p)
    assert a2("patient", uid) == p  # same key, new instance: same pseudonym (resumable, stable splits)
    assert b("patient", uid) != p  # another key: unlinkable
    assert a1("study", uid) != p and a1("series", uid) != p  # namespaced by kind
    assert a1("patient", uid + "0") != p
    assert Pseudonymizer("key-a" * 8)("patient", uid) == p  # a str secret is its UTF-8 bytes
    # A pseudonym is not a plain hash of the UID (which could be brute-forced from UID roots).
    import hashlib

    assert p not in hashlib.sha256(uid.encode()).hexdigest()
    assert p not in hashlib.sha256(f"patient\x00{uid}".encode()).hexdigest()


def test_an_empty_secret_is_refused():
    with pytest.raises(ValueError):
        Pseudonymizer(b"")


SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def test_split_is_deterministic_and_ignores_dict_order():
    a, b = Pseudonymizer(b"s" * 32), Pseudonymizer(b"s" * 32)
    reordered = {"test": 0.1, "val": 0.1, "train": 0.8}
    keys = [a("patient", f"P{i}") for i in range(2000)]
    assert [a.split(k, SPLITS) for k in keys] == [b.split(k, reordered) for k in keys]


def test_split_fractions_hold_over_10k_patients():
    p = Pseudonymizer(b"fractions" * 4)
    n = 10_000
    counts = Counter(p.split(p("patient", f"PAT{i:05d}"), SPLITS) for i in range(n))
    assert set(counts) == set(SPLITS)
    for name, frac in SPLITS.items():
        assert abs(counts[name] / n - frac) < 0.02, counts


def test_split_depends_on_the_key():
    keys = [f"{i:024x}" for i in range(500)]
    s1 = [Pseudonymizer(b"one" * 10).split(k, SPLITS) for k in keys]
    s2 = [Pseudonymizer(b"two" * 10).split(k, SPLITS) for k in keys]
    assert s1 != s2


def test_a_zero_fraction_split_never_receives_a_patient():
    p = Pseudonymizer(b"z" * 32)
    # Fractions that fall short of 1 (rounding; exaggerated here to 1e-3 so that the remainder is
    # actually drawn in 5000 patients): the remainder goes to the last positive split, never "zzz".
    splits = {"a": 0.7, "b": 0.2, "c": 0.1 - 1e-3, "zzz": 0.0}
    got = {p.split(f"{i:024x}", splits) for i in range(5000)}
    assert "zzz" not in got and got == {"a", "b", "c"}
    assert {p.split(f"{i:024x}", {"only": 1.0}) for i in range(100)} == {"only"}


def test_bucket_is_deterministic_and_roughly_uniform():
    n = 8
    keys = [Pseudonymizer(b"b" * 32)("series", str(i)) for i in range(8000)]
    buckets = [Pseudonymizer.bucket(k, n) for k in keys]
    assert buckets == [Pseudonymizer.bucket(k, n) for k in keys]
    counts = Counter(buckets)
    assert set(counts) == set(range(n))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000
    assert Pseudonymizer.bucket(keys[0], 1) == 0 and Pseudonymizer.bucket(keys[0], 0) == 0


# ----------------------------------------------------------------------------- metadata allow-list

PHI_HEADER = {
    # identifying: none of these may come out, whatever their names
    "PatientName": "DOE^JOHN",
    "PatientID": "MRN-4455",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC-778899",
    "StudyInstanceUID": "1.2.3.4.5",
    "InstitutionName": "Saint Elsewhere Hospital",
    "StudyDescription": "CHEST for DOE",
    "ImageComments": "patient John Doe",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "(0x0029,0x0010)": "private note DOE",
    "PatientAge": "067Y",
    "PatientSex": "F",
    # allowed
    "Manufacturer": "ACME Medical",
    "KVP": 120.0,
    "ConvolutionKernel": ["B30f", "3"],
    "SliceThickness": "2.5",
    "BodyPartExamined": "CHEST",
    "BitsStored": 12,
    "PhotometricInterpretation": "MONOCHROME2",
}


def _all_values(d) -> list[str]:
    out = []
    for v in d.values():
        out += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return out


def test_safe_metadata_is_an_allow_list():
    out = deid.safe_metadata(PHI_HEADER, DeidConfig())
    assert out == {
        "manufacturer": "ACME Medical",
        "kvp": 120.0,
        "kernel": ["B30f", 3.0],
        "slice_thickness_mm": 2.5,
        "body_part": "CHEST",
        "source_bits_stored": 12,
        "source_photometric": "MONOCHROME2",
    }
    text = " ".join(_all_values(out)).lower()
    for planted in ("doe", "john", "4455", "1970", "778899", "elsewhere", "1.2.3.4.5", "gregory", "067y"):
        assert planted not in text


def test_age_and_sex_only_when_configured():
    assert "age" not in deid.safe_metadata(PHI_HEADER, DeidConfig())
    kept = deid.safe_metadata(PHI_HEADER, DeidConfig(keep_age_sex=True))
    assert kept["age"] == "067Y" and kept["sex"] == "F"


@pytest.mark.parametrize(
    "value",
    [
        "x" * 65,  # too long to be a plain acquisition value
        "ACME\nDOE^JOHN",  # control characters
        "ACME <script>",
        "Dr. O'Brien's scanner",  # quotes are outside the plain alphabet
        "Müller Medical",  # non-ASCII
        "DOE^JOHN",  # a PN separator never belongs in an allowed attribute
        float("nan"),
        float("inf"),
        True,
        b"bytes",
        "",
        [],
        ["ok", "bad\x00"],
        {"nested": "dict"},
    ],
)
def test_odd_values_are_dropped_not_escaped(value):
    assert deid.safe_metadata({"Manufacturer": value}, DeidConfig()) == {}


def test_plain_values_pass_cleaned():
    out = deid.safe_metadata(
        {"Manufacturer": "  GE MEDICAL SYSTEMS ", "KVP": "120", "ViewPosition": "PA", "SliceThickness": 1},
        DeidConfig(),
    )
    assert out == {"manufacturer": "GE MEDICAL SYSTEMS", "kvp": 120.0, "view_position": "PA", "slice_thickness_mm": 1}


# ----------------------------------------------------------------------------- report redaction


def _redact(text: str, *values: str) -> str:
    return deid.redact_report(text, deid.identifying_terms(values))


@pytest.mark.parametrize(
    "text",
    [
        "Patient DOE^JOHN seen.",
        "Patient John Doe seen.",
        "Patient JOHN DOE seen.",
        "Patient Doe, John seen.",
        "Patient DOE JOHN seen.",
        "Patient john doe seen.",
        "Patient Mr. Doe seen.",
        "Patient John seen.",
        "Patient Doe's lungs seen.",
        "Patient John\nDoe seen.",  # wrapped across lines
    ],
)
def test_names_are_caught_in_any_case_and_order(text):
    out = _redact(text, "DOE^JOHN")
    assert "doe" not in out.lower() and "john" not in out.lower()
    assert out.startswith("Patient ") and out.endswith(" seen.") and REDACTED in out


def test_comma_form_names_and_multi_word_family_names():
    out = _redact("Seen by Dr Smith and Anne-Marie van der Berg, and Berg again.", "SMITH, ALAN", "VAN DER BERG^ANNE-MARIE")
    assert "Smith" not in out and "Anne" not in out and "Marie" not in out and "Berg" not in out
    assert out.startswith("Seen by Dr ")


def test_ids_and_accession_numbers():
    out = _redact(
        "MRN 00123456, mrn:00123456, MRN00123456; accession acc-778899 (ACC-778899). Other 123456789.",
        "00123456",
        "ACC-778899",
    )
    assert "00123456" not in out and "778899" not in out
    assert "123456789" in out  # an ID never matches inside a longer number


@pytest.mark.parametrize(
    "spelling", ["19700102", "1970-01-02", "01/02/1970", "1/2/1970", "02.01.1970", "1970/01/02"]
)
def test_birth_dates_in_any_common_spelling(spelling):
    out = _redact(f"DOB {spelling}.", "19700102")
    assert "1970" not in out and out.startswith("DOB ") and out.endswith(".")


@pytest.mark.parametrize(
    "date",
    ["2024-03-05", "2024/03/05", "03/05/2024", "3/5/24", "05.03.2024", "20240305", "March 5, 2024", "Mar. 5 2024",
     "5 March 2024", "5th March 2024", "03-05-2024"],
)
def test_any_date_becomes_a_date_marker(date):
    out = deid.redact_report(f"Compared with prior from {date}, stable.", [])
    assert out == f"Compared with prior from {DATE}, stable."


def test_ordinary_words_and_measurements_survive():
    """Short name parts match whole words only: "LI" does not shred "clinical" or "liver"."""
    text = (
        "Clinical history: cough. The liver and spleen are normal. A 12 mm nodule in segment 4, "
        "series 3 image 120. Heart size is normal. Follow-up CT in 3-6 months. Mass 1.5 x 2.0 cm."
    )
    out = _redact(text, "LI^NA", "12", "4", "A", "M")  # a StudyID "12", initials "A", "M"
    assert out == text


def test_name_parts_that_are_ordinary_words_are_redacted_privacy_first():
    """Documented trade-off (see redact_report): a patient NO^EFFUSION loses those words as words."""
    out = _redact("No pleural effusion. Effusions: none. Nothing else.", "NO^EFFUSION")
    assert out == f"{REDACTED} pleural {REDACTED}. Effusions: none. Nothing else."


def test_institutions_are_phrases_not_words():
    text = "Transferred from Saint Elsewhere General Hospital. General appearance normal; hospital course brief."
    out = _redact(text, "Saint Elsewhere General Hospital")
    assert out == f"Transferred from {REDACTED}. General appearance normal; hospital course brief."


def test_addresses_are_cut_into_lines():
    out = _redact("Lives at 12 Elm Road in Springfield.", "12 Elm Road, Springfield")
    assert "Elm" not in out and "Springfield" not in out


def test_a_full_name_is_replaced_as_one_unit_and_markers_are_not_rematched():
    out = _redact("John Doe", "DOE^JOHN", "REDACTED", "DATE")
    assert out.count("[") == out.count("]") and "John" not in out and "Doe" not in out
    assert deid.redact_report("no terms here", []) == "no terms here"
    assert deid.redact_report("x", ["", "  ", None]) == "x"


def test_regex_metacharacters_in_values_are_literal():
    out = _redact("ID (A+B)*3 and AB3.", "(A+B)*3")
    assert out == f"ID {REDACTED} and AB3."


def test_identifying_terms_shape():
    terms = deid.identifying_terms(["DOE^JOHN^^DR", None, "", "  ", "12", "19700102", "X"])
    assert terms == sorted(terms, key=lambda t: (-len(t), t))  # longest first
    assert {"DOE", "JOHN", "DR", "DOE JOHN DR", "1970-01-02", "01/02/1970"} <= set(terms)
    assert "12" not in terms and "X" not in terms and "" not in terms
    # An 8-digit ID that is not a valid date gets no date spellings.
    assert not any("/" in t for t in deid.identifying_terms(["12345678"]))


def test_planted_phi_from_a_phantom_report_is_removed():
    from radforge import phantoms

    study = phantoms.make_study(phantoms.make_patient(7))
    p = study.patient
    values = [
        p.name, p.patient_id, p.other_id, p.birth_date, p.address, study.accession, study.study_id,
        study.institution, study.institution_address, study.referring_physician,
        study.performing_physician, study.requesting_physician, study.operator,
    ]
    out = deid.redact_report(study.report, deid.identifying_terms(values))
    assert phantoms.PHI_MARKER not in out
    for dob in p.birth_date_variants:
        assert dob not in out
    assert "FINDINGS:" in out and "IMPRESSION:" in out
