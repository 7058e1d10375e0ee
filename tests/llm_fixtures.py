"""Session fixtures of the LLM tests (imported explicitly by the test modules).

The tiny preset's support model (a ~1.2M-parameter Llama trained from scratch on the corpus
of 60 fictitious customers, ~70 s on 2 idle cores) is built once per pytest session.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forgetflow.config import Params, load_params


@pytest.fixture(scope="session")
def llm_params() -> Params:
    return load_params(preset="tiny")


@pytest.fixture(scope="session")
def support_llm(tmp_path_factory, llm_params) -> Path:
    """Folder with corpus.jsonl, eval_kit/ and model/ (the tiny support model)."""
    from forgetflow.llm.support_model import finetune_model, make_support_corpus

    root = tmp_path_factory.getbasetemp() / "llm-cache" / "support-llm-tiny"
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_support_corpus(llm_params, root)
        finetune_model(root / "corpus.jsonl", root / "model", llm_params, progress=False)
        (root / ".done").touch()
    return root
