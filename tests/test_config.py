import subprocess
import sys

import pytest

from rangedispatch import load_config
from rangedispatch.config import DispatchConfig, RangeDispatchConfig
from rangedispatch.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(["hardware=cpu", "dispatch.split_points=[32,8,8]"])
    assert cfg.dispatch.split_points == [8, 32]
    assert cfg.hardware.name == "cpu"
    assert cfg.fusion.enabled is True
    assert load_config(["dispatch.token_dim=[0,1]", "dispatch.token_arg=hidden"]).dispatch.token_dims == [0, 1]


@pytest.mark.parametrize("override, expected", [
    ("dispatch.split_points=[0,8]", "dispatch.split_points=[0, 8] is not allowed: element 0 is not an integer in [1, 8191]"),
    ("dispatch.split_points=[8192]", "dispatch.split_points=[8192] is not allowed with dispatch.max_num_tokens=8192: "
     "split points lie in [1, 8191]"),
    ("dispatch.max_num_tokens=16", "dispatch.split_points=[8, 32] is not allowed with dispatch.max_num_tokens=16: split "
     "points lie in [1, 15] (the default config sets some: override them too, e.g. dispatch.split_points=[])"),
    ("dispatch.split_points=[1.5]", "element 1.5 is not an integer"),
    ("dispatch.split_points=8", "dispatch.split_points=8 is not allowed; expected a list"),
    ("dispatch.compile_sizes=[0]", "dispatch.compile_sizes=[0] is not allowed: element 0 is not an integer in [1, 8192]"),
    ("dispatch.compile_sizes=[9000]", "element 9000 is not an integer in [1, 8192]"),
    ("dispatch.max_num_tokens=abc", "dispatch.max_num_tokens='abc' is not allowed; expected an integer >= 1"),
    ("dispatch.out_of_range=skip", "dispatch.out_of_range='skip' is not allowed; expected one of error, eager, compile"),
    ("compile.max_autotune=sometimes", "expected one of never, single_sizes, always"),
    ("fusion.enabled=3", "fusion.enabled=3 is not allowed; expected true or false"),
    ("dispatch.token_dim=[0,0]", "dispatch.token_dim=[0, 0] is not allowed"),
    ("dispatch.cudagraph_sizes=[0]", "dispatch.cudagraph_sizes=[0] is not allowed: element 0 is not an integer in [1, 8192]"),
    ("dispatch.foo=1", "unknown key 'dispatch.foo'; allowed keys under dispatch: split_points"),
    ("+dispatch.foo=1", "unknown key 'dispatch.foo'"),
    ("foo=1", "unknown key 'foo'; allowed keys under the root: dispatch, compile, fusion, hardware"),
    ("hardware=tpu9", "hardware='tpu9' is not a known hardware profile; available: auto (detect this machine's), b200, cpu, "
     "gpu_generic, h100, h200"),
    ("hardware=cpu hardware.thresholds.default.fused_max_bytes=-1", "hardware.thresholds.default.fused_max_bytes=-1 is not allowed"),
    ("hardware=cpu hardware.thresholds.default.symm_mem_max_bytes=1",
     "hardware.thresholds.default.symm_mem_max_bytes is not set in the selected config (it defaults to 0); to set "
     "it, add it: '+hardware.thresholds.default.symm_mem_max_bytes=...'"),
    ("hardware=cpu +hardware.thresholds.default.bogus=1",
     "unknown key 'hardware.thresholds.default.bogus'; allowed keys under hardware.thresholds.default: fused_max_bytes"),
    ("fusion.symm_mem=maybe", "fusion.symm_mem='maybe' is not allowed; expected true or false"),
    ("hardware=h200 hardware.compile_sizes_with_cudagraphs=[0]",
     "hardware.compile_sizes_with_cudagraphs=[0] is not allowed: element 0 is not an integer >= 1"),
    ("hardware=h200 hardware.compile_sizes_with_cudagraphs=abc",
     "hardware.compile_sizes_with_cudagraphs='abc' is not allowed; expected null or a list of integers >= 1"),
])
def test_bad_input_names_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(override.split())
    assert expected in str(e.value)
    assert isinstance(e.value, ValueError)


def test_schema_in_code_validates_too():
    with pytest.raises(ConfigError, match=r"dispatch.split_points=\[100\] is not allowed"):
        RangeDispatchConfig(dispatch=DispatchConfig(split_points=[100], max_num_tokens=64))


def test_host_hydra_app_state_is_untouched():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rangedispatch.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir() / "hardware"), version_base="1.3"):
        before = GlobalHydra.instance().hydra
        cfg = load_config(["dispatch.split_points=[4]"])
        assert cfg.dispatch.split_points == [4]
        assert GlobalHydra.instance().hydra is before
        assert compose(config_name="cpu").name == "cpu"  # the host still composes its own configs


def test_cli_prints_composed_config():
    out = subprocess.run([sys.executable, "-m", "rangedispatch.cli.demo", "--cfg", "job", "hardware=cpu", "dispatch.split_points=[16]"],
                         capture_output=True, text=True, check=True).stdout
    assert "split_points:\n  - 16" in out and "name: cpu" in out


def test_cudagraphs_need_a_single_token_dim():
    with pytest.raises(ConfigError, match=r"dispatch.token_dim=\[0, 1\] is not allowed; expected a single dim when dispatch.cudagraph_sizes is set"):
        load_config(["dispatch.cudagraph_sizes=[8]", "dispatch.token_dim=[0,1]"])


def test_auto_picks_the_machine_profile_and_explicit_wins(caplog):
    import logging

    from rangedispatch.config.detect import profile_for_device

    with caplog.at_level(logging.INFO, logger="rangedispatch"):
        assert load_config().hardware.name == "cpu"  # this machine has no CUDA device
    assert "hardware=auto picked 'cpu': no CUDA device" in caplog.text
    assert load_config(["hardware=h100"]).hardware.name == "h100"
    available = ["cpu", "h100", "h200", "b200", "gpu_generic"]
    assert profile_for_device("NVIDIA H100 80GB HBM3", (9, 0), available)[0] == "h100"
    assert profile_for_device("NVIDIA H200", (9, 0), available)[0] == "h200"
    assert profile_for_device("NVIDIA B200", (10, 0), available)[0] == "b200"
    profile, why = profile_for_device("NVIDIA L40S", (8, 9), available)
    assert profile == "gpu_generic" and "rangedispatch.cli.tune" in why and "NVIDIA L40S" in why


def test_auto_refuses_profile_overrides():
    with pytest.raises(ConfigError, match="hardware=auto takes no other hardware keys"):
        load_config(["+hardware.fused_backend=reference"])


MY_PROFILE = """name: mybox
fused_backend: reference
device_name: cpu
thresholds:
  "2":
    fused_max_bytes: 4096
    oneshot_max_bytes: 4096
"""


def _user_profile(root, name="mybox"):
    (root / "hardware").mkdir(parents=True)
    (root / "hardware" / f"{name}.yaml").write_text(MY_PROFILE.replace("mybox", name))


def test_user_profiles_from_the_search_path_and_the_per_user_folder(tmp_path, monkeypatch):
    from rangedispatch.config import hardware_profiles

    _user_profile(tmp_path / "team")
    _user_profile(tmp_path / "xdg" / "rangedispatch", "mine")
    monkeypatch.setenv("RANGEDISPATCH_PROFILE_PATH", str(tmp_path / "team"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert load_config(["hardware=mybox"]).hardware.thresholds_for(2).fused_max_bytes == 4096
    assert load_config(["hardware=mine"]).hardware.name == "mine"
    assert {"mybox", "mine", "cpu"} <= set(hardware_profiles())


def test_auto_prefers_a_tuned_profile_for_this_device_and_world_size(tmp_path, monkeypatch):
    _user_profile(tmp_path / "xdg" / "rangedispatch")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config(["hardware=auto"]).hardware.name == "mybox"
    monkeypatch.setenv("WORLD_SIZE", "4")  # measured for 2 ranks only: the built-in profile
    assert load_config(["hardware=auto"]).hardware.name == "cpu"


def test_the_cli_finds_user_profiles(tmp_path):
    import os
    import subprocess
    import sys

    _user_profile(tmp_path / "team")
    env = dict(os.environ, RANGEDISPATCH_PROFILE_PATH=str(tmp_path / "team"))
    out = subprocess.run([sys.executable, "-m", "rangedispatch.cli.demo", "hardware=mybox", "--cfg", "job"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "name: mybox" in out and "fused_max_bytes: 4096" in out


def test_a_user_profile_named_like_a_built_in_one_is_reported_and_not_used(tmp_path, monkeypatch, caplog):
    _user_profile(tmp_path / "team", "h100")
    monkeypatch.setenv("RANGEDISPATCH_PROFILE_PATH", str(tmp_path / "team"))
    with caplog.at_level("WARNING", logger="rangedispatch"):
        hw = load_config(["hardware=h100"]).hardware
    assert hw.fused_backend == "flashinfer"  # the built-in h100, not the user's reference profile
    assert [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()] == [
        f"{tmp_path / 'team' / 'hardware' / 'h100.yaml'} is not used: the built-in profile 'h100' has that name; "
        "rename the file and its 'name:'"]


def test_a_broken_user_profile_is_named_when_asked_for_and_skipped_by_auto(tmp_path, monkeypatch, caplog):
    _user_profile(tmp_path / "team")
    (tmp_path / "team" / "hardware" / "broken.yaml").write_text("name: broken\nthresholds: {a: 1\nfused_backend: x\n")
    monkeypatch.setenv("RANGEDISPATCH_PROFILE_PATH", str(tmp_path / "team"))
    with pytest.raises(ConfigError) as e:
        load_config(["hardware=broken"])
    assert str(e.value) == (f"{tmp_path / 'team' / 'hardware' / 'broken.yaml'}, line 3: not valid YAML "
                            "(expected ',' or '}', but got ':')")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="rangedispatch"):
        assert [load_config().hardware.name for _ in range(2)] == ["mybox", "mybox"]  # the good tuned one still wins
    assert [r.getMessage() for r in caplog.records] == [f"hardware=auto skips a broken profile: {e.value}"]


def test_auto_counts_the_ranks_a_cli_will_spawn(tmp_path, monkeypatch):
    from rangedispatch.config import compose_config, to_schema

    _user_profile(tmp_path / "xdg" / "rangedispatch")  # measured for 2 ranks
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert to_schema(compose_config(), world_size=2).hardware.name == "mybox"
    assert to_schema(compose_config(), world_size=4).hardware.name == "cpu"


def test_a_bad_log_level_is_refused_on_every_construction(monkeypatch):
    import torch

    from rangedispatch import RangeCompiledModule

    monkeypatch.setenv("RANGEDISPATCH_LOGS", "loud")
    for _ in range(2):
        with pytest.raises(ConfigError, match="RANGEDISPATCH_LOGS='loud' is not a log level; allowed: debug, info, warning"):
            RangeCompiledModule(torch.nn.Linear(4, 4), load_config(["hardware=cpu"]))


def test_one_override_may_be_a_plain_string():
    assert load_config("dispatch.max_num_tokens=64").dispatch.max_num_tokens == 64
