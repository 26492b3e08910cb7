"""The README's config reference is generated from the dataclass docs: keep it current."""

import os
import re

from pretrain.config import composition_reference, config_reference

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_config_reference_is_current():
    text = open(README).read()
    block = re.search(r"<!-- config-reference:start.*?-->\n(.*?)\n<!-- config-reference:end -->", text, re.S)
    assert block, "README lacks the config-reference markers"
    assert block.group(1).strip() == config_reference().strip(), "regenerate it with `pretrain config --docs`"


def test_readme_composition_table_is_current():
    text = open(README).read()
    block = re.search(r"<!-- composition:start.*?-->\n(.*?)\n<!-- composition:end -->", text, re.S)
    assert block, "README lacks the composition markers"
    assert block.group(1).strip() == composition_reference().strip(), "regenerate it with `pretrain config --docs`"


def test_readme_names_both_quickstart_commands():
    text = open(README).read()
    assert "make quickstart" in text and "make test" in text
    assert "make test" in open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
