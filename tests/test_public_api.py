"""Every name a package's __init__ promises resolves to a real object (and importing a package stays cheap)."""
import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["saeforge", "collect", "sae", "analysis"])
def test_public_names_resolve(package):
    mod = importlib.import_module(package)
    assert mod.__all__
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError):
        getattr(mod, "no_such_name")


def test_importing_a_package_loads_no_stage_module():
    code = ("import sys, collect, sae, analysis; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('collect', 'sae', 'analysis') and '.' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
