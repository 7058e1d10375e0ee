"""Session fixtures of the LLM tests (imported explicitly by the test modules).

The tiny preset's support model (a ~1.2M-parameter Llama trained from scratch on the corpus
of 60 fictitious customers, ~70 s on 2 idle cores) is built once per pytest session.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from forgetflow.config import Params, load_params
from tests.session_cache import built_once


@pytest.fixture(scope="session")
def llm_params() -> Params:
    return load_params(preset="tiny")


@pytest.fixture(scope="session")
def support_llm(tmp_path_factory, llm_params) -> Path:
    """Folder with corpus.jsonl, eval_kit/ and model/ (the tiny support model)."""
    from forgetflow.llm.support_model import finetune_model, make_support_corpus

    def build(root: Path) -> None:
        make_support_corpus(llm_params, root)
        finetune_model(root / "corpus.jsonl", root / "model", llm_params, progress=False)

    return built_once(tmp_path_factory, "support-llm-tiny", build)
