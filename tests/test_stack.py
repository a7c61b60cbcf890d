"""The supported stack is checked at import: an unsupported Python or megatron-core is refused by name."""

import re
import sys
from importlib import metadata

import pytest

from granular_moe.stack import SUPPORTED_TEXT, UnsupportedStackError, check_stack


def test_this_environment_is_the_supported_stack():
    check_stack()
    assert sys.version_info >= (3, 12)
    assert metadata.version("megatron-core").startswith("0.19.")


@pytest.mark.parametrize("version", ["0.19.0", "0.19.2", "0.19.3rc1"])
def test_megatron_core_0_19_is_accepted(version):
    check_stack(megatron_core=version)


@pytest.mark.parametrize("version", ["0.16.1", "0.18.2", "0.20.0", "1.0.0"])
def test_other_megatron_core_releases_are_refused_naming_the_supported_ones(version):
    with pytest.raises(UnsupportedStackError, match=re.escape(f"megatron-core {version} is installed")) as error:
        check_stack(megatron_core=version)
    assert SUPPORTED_TEXT in str(error.value) and ">=0.19,<0.20" in str(error.value)


def test_python_older_than_3_12_is_refused():
    with pytest.raises(UnsupportedStackError, match=r"this is Python 3\.11: run bash install\.sh"):
        check_stack(python=(3, 11), megatron_core="0.19.2")
