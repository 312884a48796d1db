"""The registry: registering in a script, discovery through entry points, --loss-module, errors."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

import pairopt
import pairopt.loss.registry as loss_registry
from pairopt import PairLogps
from pairopt.errors import PairoptError
from pairopt.loss import LossConfig, reward_metrics

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_NAMES = {
    "dpo", "ipo", "orpo", "simpo", "kto_pair", "hinge", "robust", "cpo", "bco_pair", "nca_pair",
    "exo_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm", "rpo", "sft", "combined",
    "aot", "aot_unpaired", "discopop", "plackett_luce",
}  # fmt: skip

POLICY = PairLogps(
    torch.tensor([-10.0]), torch.tensor([-14.0]), torch.tensor([4]), torch.tensor([2])
)
REFERENCE = PairLogps(
    torch.tensor([-12.0]), torch.tensor([-13.0]), torch.tensor([4]), torch.tensor([2])
)


def test_register_in_the_test_file_and_build_by_name(registry):
    """Nothing installed: a class registered here is found by name, validated, and computes."""

    @pairopt.register_loss("test_scaled_margin")
    class ScaledMargin(pairopt.PairLoss):
        """−logσ(k·(S_c − S_r)): a reference-free toy loss."""

        requires_reference = False

        class Config(LossConfig):
            k: float = Field(1.0, gt=0, description="scale of the margin")

        config: Config

        def compute(self, policy, reference):
            margin_N = self.config.k * (policy.chosen_logps - policy.rejected_logps)
            return pairopt.LossOutput(
                -F.logsigmoid(margin_N),
                reward_metrics(policy, policy.chosen_logps, policy.rejected_logps),
            )

    assert "test_scaled_margin" in pairopt.available_losses()
    assert pairopt.get_loss_class("test_scaled_margin") is ScaledMargin
    assert ScaledMargin.name == "test_scaled_margin"
    assert (
        ScaledMargin.summary == "−logσ(k·(S_c − S_r)): a reference-free toy loss."
    )  # from the docstring
    loss = pairopt.build_loss("test_scaled_margin", k=0.5)
    # k·(S_c − S_r) = 0.5·4 = 2: −logσ(2) = log(1 + e^−2) = 0.126928
    torch.testing.assert_close(float(loss(POLICY).losses), 0.126928, rtol=1e-5, atol=1e-6)
    with pytest.raises(PairoptError, match=r"k=0 is invalid: Input should be greater than 0"):
        pairopt.build_loss("test_scaled_margin", k=0)


def test_duplicate_name_is_an_error(registry):
    with pytest.raises(PairoptError, match=r"'dpo' is already registered by losses\.dpo\.DPO"):

        @pairopt.register_loss("dpo")
        class Another(pairopt.PairLoss):
            """Not DPO."""

    assert pairopt.get_loss_class("dpo").__module__ == "losses.dpo"


@pytest.mark.parametrize("first_in_sys_modules", [True, False])
def test_reregistering_the_same_definition_is_allowed(
    registry, tmp_path, monkeypatch, first_in_sys_modules
):
    """A reload, or a script run as __main__ that is also imported by path, defines the class
    again from the same file: that is not a conflict. Also when the first import never entered
    sys.modules (spec_from_file_location + exec_module, as a test or a notebook does)."""
    path = tmp_path / "twice_losses.py"
    path.write_text(
        "import pairopt\n\n@pairopt.register_loss('test_twice')\n"
        "class Twice(pairopt.PairLoss):\n    'Twice.'\n\n"
        "    def compute(self, policy, reference):\n        raise NotImplementedError\n"
    )
    classes = []
    for module_name in ("twice_as_main", "twice_losses"):
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        if first_in_sys_modules or module_name == "twice_losses":
            monkeypatch.setitem(sys.modules, module_name, module)  # as Python does for imports
        spec.loader.exec_module(module)
        classes.append(module.Twice)
    assert classes[0] is not classes[1]
    assert pairopt.get_loss_class("test_twice") is classes[1]


def test_same_name_from_another_file_is_still_refused(registry, tmp_path):
    for stem in ("one_file", "other_file"):
        (tmp_path / f"{stem}.py").write_text(
            "import pairopt\n\n@pairopt.register_loss('test_clash')\n"
            "class Clash(pairopt.PairLoss):\n    'Clash.'\n\n"
            "    def compute(self, policy, reference):\n        raise NotImplementedError\n"
        )
    loss_registry.load_loss_module(str(tmp_path / "one_file.py"))
    with pytest.raises(PairoptError, match="'test_clash' is already registered"):
        loss_registry.load_loss_module(str(tmp_path / "other_file.py"))


def test_register_refuses_what_is_not_a_loss(registry):
    with pytest.raises(TypeError, match="PairLoss subclasses"):
        pairopt.register_loss("test_not_a_loss")(int)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="identifier"):
        pairopt.register_loss("has space")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(PairoptError) as info:
        pairopt.build_loss("dpoo")
    message = str(info.value)
    assert "unknown loss 'dpoo'" in message
    assert all(name in message for name in BUILTIN_NAMES)
    assert "--loss-module" in message


def test_bad_parameters_name_field_value_and_bound():
    with pytest.raises(PairoptError) as info:
        pairopt.build_loss("dpo", beta=-0.5)
    message = str(info.value)
    assert "'dpo'" in message and "beta=-0.5" in message and "greater than 0" in message
    with pytest.raises(
        PairoptError, match=r"label_smoothing=0\.5 is invalid: Input should be less than 0\.5"
    ):
        pairopt.build_loss("dpo", label_smoothing=0.5)
    with pytest.raises(PairoptError, match=r"beta='big' is invalid"):
        pairopt.build_loss("dpo", beta="big")
    with pytest.raises(
        PairoptError,
        match=r"unknown parameter 'betta' \(parameters of 'dpo': beta, label_smoothing, f_divergence",
    ):
        pairopt.build_loss("dpo", betta=0.1)
    with pytest.raises(PairoptError, match=r"missing required parameter 'terms'"):
        pairopt.build_loss("combined")


def test_entry_point_group_names_the_builtin_package():
    entry_points = importlib.metadata.entry_points(group="pairopt.losses")
    assert "losses" in {ep.value for ep in entry_points}


def test_entry_point_path_finds_the_builtins_in_a_fresh_process():
    """In a clean interpreter nothing imports `losses` until the first registry lookup, which reads
    the entry points; `import pairopt` itself stays light (no pydantic)."""
    code = textwrap.dedent(
        """
        import sys
        import pairopt
        assert "pydantic" not in sys.modules, "import pairopt must not import pydantic"
        assert "losses" not in sys.modules
        names = pairopt.available_losses()
        assert "losses" in sys.modules
        cls = pairopt.get_loss_class("dpo")
        print(cls.__module__, ",".join(names))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert result.returncode == 0, result.stderr
    module, names = result.stdout.split()
    assert module == "losses.dpo"
    assert set(names.split(",")) == BUILTIN_NAMES


def test_a_third_party_entry_point_is_loaded_like_the_builtins(registry, tmp_path, monkeypatch):
    """A package that declares `[project.entry-points."pairopt.losses"]` is imported on first lookup."""
    (tmp_path / "thirdparty_losses.py").write_text(
        textwrap.dedent(
            """
            import pairopt

            @pairopt.register_loss("test_thirdparty")
            class ThirdParty(pairopt.PairLoss):
                '''A loss from another distribution.'''
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = [
        importlib.metadata.EntryPoint(name="builtin", value="losses", group="pairopt.losses"),
        importlib.metadata.EntryPoint(
            name="extra", value="thirdparty_losses", group="pairopt.losses"
        ),
        importlib.metadata.EntryPoint(
            name="broken", value="no_such_module_xyz", group="pairopt.losses"
        ),
    ]
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [ep for ep in fake if ep.group == group]
    )
    monkeypatch.setattr(loss_registry, "_entry_points_loaded", False)
    with pytest.warns(UserWarning, match=r"could not load loss plugins from entry point 'broken'"):
        names = pairopt.available_losses()
    assert "test_thirdparty" in names and set(names) >= BUILTIN_NAMES
    monkeypatch.delitem(sys.modules, "thirdparty_losses")


def test_loss_module_by_name_by_path_and_from_the_working_directory(
    registry, tmp_path, monkeypatch
):
    body = "import pairopt\n\n@pairopt.register_loss({name!r})\nclass L(pairopt.PairLoss):\n    '''A loss.'''\n"
    (tmp_path / "pkg_losses_a.py").write_text(body.format(name="test_mod_a"))
    (tmp_path / "file_losses_b.py").write_text(body.format(name="test_mod_b"))
    (tmp_path / "cwd_losses_c.py").write_text(body.format(name="test_mod_c"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert pairopt.loss.load_loss_module("pkg_losses_a") == ["test_mod_a"]
    assert pairopt.loss.load_loss_module(str(tmp_path / "file_losses_b.py")) == ["test_mod_b"]
    assert pairopt.loss.load_loss_module(str(tmp_path / "file_losses_b.py")) == []  # already loaded
    monkeypatch.undo()  # tmp_path off sys.path: only the working directory can find cwd_losses_c
    monkeypatch.chdir(tmp_path)
    assert pairopt.loss.load_loss_module("cwd_losses_c") == ["test_mod_c"]
    for module in ("pkg_losses_a", "cwd_losses_c"):
        sys.modules.pop(module, None)


def test_loss_module_failures_are_pairopt_errors(tmp_path):
    with pytest.raises(PairoptError, match=r"cannot import loss module 'no_such_losses_xyz'"):
        pairopt.loss.load_loss_module("no_such_losses_xyz")
    with pytest.raises(PairoptError, match=r"does not exist"):
        pairopt.loss.load_loss_module(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken_losses.py"
    broken.write_text("import pairopt\n\nraise RuntimeError('bad plugin')\n")
    with pytest.raises(
        PairoptError, match=r"RuntimeError: bad plugin \(at .*broken_losses\.py:3\)"
    ):
        pairopt.loss.load_loss_module(str(broken))


def test_example_custom_loss_registers_and_builds(registry):
    """examples/custom_loss.py: importing it registers `margin_dpo` (training runs only as a script)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pairopt.loss.load_loss_module(str(ROOT / "examples" / "custom_loss.py")) in (
            ["margin_dpo"],
            [],
        )
    loss = pairopt.build_loss("margin_dpo", beta=0.1, margin=0.2)
    assert loss.requires_reference
    # Δ = 3, β·Δ − m = 0.3 − 0.2 = 0.1: −logσ(0.1) = log(1 + e^−0.1) = 0.644397
    torch.testing.assert_close(
        float(loss(POLICY, REFERENCE).losses), 0.644397, rtol=1e-5, atol=1e-6
    )
    source = (ROOT / "examples" / "custom_loss.py").read_text().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("@pairopt.register_loss"))
    end = next(i for i, line in enumerate(source) if line.startswith("def train"))
    assert end - start < 30, "the example promises a loss in under 30 lines"


@pytest.mark.slow
def test_example_custom_loss_trains(registry):
    """The example's training loop: 5 steps on a tiny Llama with the shared forward lower the loss."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "custom_loss_example", ROOT / "examples" / "custom_loss.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.train(steps=5)
    assert len(history) == 5 and all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0]


def test_an_empty_registry_says_how_to_get_the_builtins(registry, monkeypatch):
    """Without the installed distribution there are no entry points, hence no built-ins."""
    registry.clear()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    monkeypatch.setattr(loss_registry, "_entry_points_loaded", False)
    assert pairopt.available_losses() == []
    with pytest.raises(PairoptError, match=r"no losses are registered at all.*pip install -e \."):
        pairopt.build_loss("dpo")
