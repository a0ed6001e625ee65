"""Shipped hardware profiles: every file loads, the required devices are there, names and aliases
resolve without ambiguity, and a broken profile is refused with a one-line UserError that names
the file and the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.errors import UserError
from simulator.hardware import PROFILE_DIR, _normalise, load_profile, profile_from_file, shipped_profiles

REQUIRED = {
    "A100-80GB-SXM",
    "V100-SXM2-32GB",
    "T4",
    "A10G",
    "L4",
    "L40S",
    "A100-40GB-SXM",
    "H100-SXM",
    "H100-PCIe",
    "H200",
    "B200",
    "GB200",
    "B300",
    "RTX-PRO-6000-Blackwell-Server",
    "RTX-4090",
    "MI300X",
}

ALIASES = {
    "a100": "A100-80GB-SXM",
    "h100": "H100-SXM",
    "a100-40gb": "A100-40GB-SXM",
    "v100": "V100-SXM2-32GB",
    "t4": "T4",
    "a10g": "A10G",
    "l4": "L4",
    "l40s": "L40S",
    "h100-pcie": "H100-PCIe",
    "h200": "H200",
    "h20": "H20",
    "b200": "B200",
    "gb200": "GB200",
    "gb200-nvl72": "GB200",
    "gb300": "GB300",
    "gb300-nvl72": "GB300",
    "b300": "B300",
    "b300-hgx": "B300",
    "rtx-pro-6000-blackwell-server": "RTX-PRO-6000-Blackwell-Server",
    "rtx-pro-6000": "RTX-PRO-6000-Blackwell-Server",
    "rtx-pro-6000-server": "RTX-PRO-6000-Blackwell-Server",
    "rtx-pro-6000-bse": "RTX-PRO-6000-Blackwell-Server",
    "4090": "RTX-4090",
    "rtx4090": "RTX-4090",
    "mi300x": "MI300X",
}

A100_YAML = PROFILE_DIR / "a100-80gb-sxm.yaml"
PROFILES = shipped_profiles()


def a100_data() -> dict:
    return yaml.safe_load(A100_YAML.read_text())


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refused(path: Path) -> str:
    """The message of the UserError that loading `path` raises; it must be a single line naming the file."""
    with pytest.raises(UserError) as caught:
        profile_from_file(path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def number_paths(data: dict) -> list[str]:
    """Dotted paths of the numbers in a profile mapping (what `sources` must cover)."""
    paths = []
    for key, value in data.items():
        if key in ("sources", "calibration") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            paths.append(key)
        elif isinstance(value, dict):
            paths.extend(f"{key}.{sub}" for sub in value)
    return paths


# --- the shipped files ---------------------------------------------------------------------------


def test_every_shipped_file_loads_and_resolves_by_name():
    files = sorted(PROFILE_DIR.glob("*.yaml"))
    assert len(PROFILES) == len(files), "two files share a profile name"
    for name, profile in PROFILES.items():
        assert load_profile(name) == profile
        assert load_profile(name.lower()).name == name


@pytest.mark.parametrize("path", sorted(PROFILE_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_file_name_is_the_lower_case_profile_name(path):
    assert path.stem == profile_from_file(path).name.lower()


def test_the_required_devices_are_shipped():
    assert len(PROFILES) >= 16
    assert set(PROFILES) >= REQUIRED, f"missing: {sorted(REQUIRED - set(PROFILES))}"


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_alias_resolves(alias, name):
    assert load_profile(alias).name == name


def test_no_name_or_alias_is_shared_by_two_profiles():
    owner: dict[str, str] = {}
    for profile in PROFILES.values():
        for key in {_normalise(k) for k in (profile.name, *profile.aliases)}:
            assert key not in owner, f"{key!r} names both {owner[key]} and {profile.name}"
            owner[key] = profile.name


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_unconfirmed_numbers_are_flagged_as_estimates(name):
    """A number whose source is an estimate, or carries only [M] tags, is listed under `estimates`."""
    profile = PROFILES[name]
    for key, text in profile.sources.items():
        tags = re.findall(r"\[([CSMD])[^\]]*\]", text)
        unconfirmed = text.lower().startswith("estimate") or (tags and set(tags) == {"M"})
        if unconfirmed:
            assert key in profile.estimates, f"{name}: {key} is unconfirmed ({text!r}) but not in estimates"


# --- broken profiles are refused -----------------------------------------------------------------


def test_the_unmodified_copy_loads(tmp_path):
    assert profile_from_file(write(tmp_path / "copy.yaml", a100_data())).name == "A100-80GB-SXM"


def test_a_file_read_again_gives_its_new_text(tmp_path):
    """Profiles are parsed once per file text: the same text gives the same (frozen) profile, an
    edited file its new values."""
    path = write(tmp_path / "mine.yaml", a100_data())
    first = profile_from_file(path)
    assert profile_from_file(path) is first
    data = a100_data()
    data["name"] = "A100-EDITED"
    write(path, data)
    assert profile_from_file(path).name == "A100-EDITED"


def test_missing_field_is_refused(tmp_path):
    data = a100_data()
    del data["sm_count"]
    message = refused(write(tmp_path / "missing.yaml", data))
    assert "field sm_count" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("hbm_bytes_per_s", 0), ("sm_count", -1), ("peak_flops_per_s.fp16", -312.0e12), ("achievable.matmul", 0.0)],
)
def test_non_positive_value_is_refused(tmp_path, field, value):
    data = a100_data()
    head, _, tail = field.partition(".")
    if tail:
        data[head][tail] = value
    else:
        data[head] = value
    message = refused(write(tmp_path / "nonpositive.yaml", data))
    assert f"field {field}" in message


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(number_paths(a100_data())), value=st.integers(max_value=0))
def test_any_non_positive_number_is_refused(tmp_path_factory, field, value):
    data = a100_data()
    head, _, tail = field.partition(".")
    if tail:
        data[head][tail] = value
    else:
        data[head] = value
    path = write(tmp_path_factory.mktemp("prop") / "nonpositive.yaml", data)
    assert field in refused(path)


def test_number_without_source_is_refused(tmp_path):
    data = a100_data()
    del data["sources"]["l2_bytes"]
    message = refused(write(tmp_path / "unsourced.yaml", data))
    assert "no source for l2_bytes" in message


def test_estimate_naming_no_field_is_refused(tmp_path):
    data = a100_data()
    data["estimates"].append("l3_bytes")
    message = refused(write(tmp_path / "estimate.yaml", data))
    assert "estimates" in message and "'l3_bytes'" in message


def test_malformed_yaml_is_refused_at_its_line(tmp_path):
    lines = A100_YAML.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("sm_count:"))
    lines[row] = "sm_count: 108: 132"
    path = tmp_path / "malformed.yaml"
    path.write_text("\n".join(lines) + "\n")
    message = refused(path)
    assert "malformed YAML" in message
    assert f"line {row + 1} " in message


def test_a_yaml_list_is_not_a_profile(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: A100\n")
    assert "mapping" in refused(path)


def test_a_vendor_prefix_or_an_sxm_suffix_does_not_change_the_part():
    assert load_profile("nvidia-b200").name == load_profile("b200_sxm").name == "B200"
    assert load_profile("gb200-sxm").name == "GB200" and load_profile("a100-80gb-sxm4").name == "A100-80GB-SXM"
    assert load_profile("h100-pcie").name == "H100-PCIe"  # a form factor that is another part stays itself
    with pytest.raises(UserError, match="unknown GPU 'sxm'"):
        load_profile("sxm")


def test_a_name_with_its_words_in_another_order_is_the_same_part():
    """`h100-80gb-sxm` (the data folder's slug order), `H100-SXM5-80GB` (a socket generation) and
    `pcie h100` name one profile each; words that fit several profiles, or none, stay unknown."""
    assert load_profile("h100-80gb-sxm").name == load_profile("H100-SXM5-80GB").name == "H100-SXM"
    assert load_profile("NVIDIA A100 SXM4 40GB").name == "A100-40GB-SXM" and load_profile("80gb-a100-sxm4").name == "A100-80GB-SXM"
    assert load_profile("pcie h100").name == "H100-PCIe"
    for unknown in ("nvidia", "sxm-nvidia", "80gb-sxm", "NVIDIA A10"):
        with pytest.raises(UserError, match="unknown GPU"):
            load_profile(unknown)


def test_a_name_with_its_memory_resolves_where_the_memory_is_the_profiles():
    """The memory's kind and size are not part of a part's name (`NVIDIA H200 141GB HBM3e`,
    `b200-sxm-180gb`), but a size that is not the profile's names another part: `h100-94gb` (the NVL's
    memory) is no H100-SXM, and the A100s stay apart by theirs."""
    assert load_profile("NVIDIA H200 141GB HBM3e").name == load_profile("h200-sxm-141gb").name == "H200"
    assert load_profile("b200-sxm-180gb").name == "B200" and load_profile("NVIDIA L40S 48GB GDDR6").name == "L40S"
    assert load_profile("a100 40gb").name == "A100-40GB-SXM" and load_profile("A100 80GB").name == "A100-80GB-SXM"
    with pytest.raises(UserError, match="unknown GPU 'h100-94gb'"):
        load_profile("h100-94gb")


def test_a_gpus_host_cpu_is_one_the_model_knows(tmp_path):
    assert {p.host_cpu for p in PROFILES.values()} == {"x86-64", "grace"}
    assert PROFILES["GB200"].host_cpu == PROFILES["GB300"].host_cpu == "grace" and PROFILES["B200"].host_cpu == "x86-64"
    message = refused(write(tmp_path / "p.yaml", {**a100_data(), "host_cpu": "power9"}))
    assert "host_cpu: unknown 'power9'" in message and "x86-64" in message
