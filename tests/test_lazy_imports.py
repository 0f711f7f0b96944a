"""``import openalign`` and the command lines that load no model (help, version, listings, usage errors)
import no torch (seconds); the public names still resolve, on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import openalign

NO_MODEL = [["--help"], ["--version"], ["train", "--help"], ["eval", "suite", "--help"], ["data", "shapes", "--help"],
            ["models"], ["recipes"], ["no-such-command"], ["train"]]


def test_commands_that_load_no_model_import_no_torch():
    script = ("import sys\nfrom openalign.cli import main\n"
              f"for argv in {NO_MODEL!r}:\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('torch imported:', sorted(name for name in sys.modules if name.split('.')[0] == 'torch')[:3])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "torch imported: []"
    assert "usage: openalign" in result.stdout and "openalign 0.1.0" in result.stdout
    assert "invalid choice: 'no-such-command'" in result.stderr


def test_import_openalign_imports_no_torch():
    script = "import sys, openalign, openalign.data.shapes\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("package", [openalign, openalign.data], ids=lambda package: package.__name__)
def test_public_names_resolve_and_are_listed(package):
    assert all(getattr(package, name) is not None for name in package.__all__)
    assert set(package.__all__) <= set(dir(package))


def test_the_api_and_its_subpackages_load_on_first_use():
    from openalign import create_model, eval, load_pretrained
    from openalign.eval.features import embed_images
    from openalign.factory import create_model as defined
    from openalign.pretrained import load_pretrained as defined_loader

    assert create_model is defined and load_pretrained is defined_loader and eval.embed_images is embed_images
    assert {"data", "eval", "losses", "models"} <= set(dir(openalign))
    assert openalign.config.parse_yaml("a: 1") == {"a": 1}  # a submodule is an attribute, as eager imports made it
    with pytest.raises(AttributeError, match="module 'openalign' has no attribute 'no_such_name'"):
        openalign.no_such_name
