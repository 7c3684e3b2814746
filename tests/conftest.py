"""Shared fixtures: a tokenizer trained on a small corpus and tiny models of five architectures."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from soir.models import TINY_ARCHS, TinySize, load_model
from soir.tokenizer import train_tokenizer

CORPUS = [
    "Alice Moon was born on 3 March 1990 and works as a baker in Port Vell.",
    "Her phone number is 555-0142 and her email is alice.moon@example.org.",
    "What is the capital of Norland? Fjordheim.",
    "Seven plus five equals twelve. The colour of grass is green.",
    "In the village of Oakridge a quiet fox named Pim collected blue stones.",
] * 4

SMALL = TinySize(hidden=32, layers=2, heads=4, intermediate=64, max_positions=64)
NEURONS = [1, 5, 7, 40]


def neuron_selection(arch: str, broadcast: bool = False):
    """(whole tensors, element masks) on a SMALL model: MLP neurons NEURONS of layer 0 (rows of
    OLMo's up_proj, a (64, 1) broadcast mask or a full (64, 32) one; columns of GPT-2's Conv1D c_fc,
    a (1, 64) mask, and its bias), plus one tensor whole."""
    if arch == "olmo":
        rows = torch.zeros(64, 1 if broadcast else 32, dtype=torch.bool)
        rows[NEURONS] = True
        return ["model.layers.1.self_attn.v_proj.weight"], {"model.layers.0.mlp.up_proj.weight": rows}
    columns = torch.zeros(1, 64, dtype=torch.bool)
    columns[0, NEURONS] = True
    bias = torch.zeros(64, dtype=torch.bool)
    bias[NEURONS] = True
    return ["transformer.h.1.attn.c_proj.weight"], {"transformer.h.0.mlp.c_fc.weight": columns, "transformer.h.0.mlp.c_fc.bias": bias}


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def make_model(tokenizer):
    """Factory: make_model(arch="olmo", dtype=torch.float32, eager=True, size=SMALL, seed=0)."""

    def make(arch: str = "olmo", dtype=torch.float32, eager: bool = True, size: TinySize = SMALL, seed: int = 0):
        return load_model(f"tiny:{arch}", tokenizer, dtype=dtype, eager_attention=eager, size=size, seed=seed)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box threads contend badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def qa_frame():
    """A small split in the SemEval schema."""
    return pd.DataFrame(
        {
            "id": ["p1qa0", "p1qa1", "p1sc1", "p2qa0"],
            "input": ["What is Alice Moon's phone number?", "Where does Alice Moon work?", "Alice Moon was born on", "What is the capital of Norland?"],
            "output": [" 555-0142", " Port Vell", " 3 March 1990 and works as a baker.", " Fjordheim"],
            "task": ["Task2", "Task2", "Task2", "Task2"],
        }
    )


@pytest.fixture(scope="session")
def quick_testbed(tmp_path_factory):
    """The reduced testbed (`soir demo --quick`'s), built once per session: data/, base/, finetuned/,
    oracle/ and oracle-1/ (the oracle recipe with another seed), and their root."""
    from analysis.demo import TestbedRecipe, build_testbed

    root = tmp_path_factory.mktemp("testbed")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        paths = build_testbed(root, TestbedRecipe.quick(), progress=False, oracle_seeds=(1,))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, **paths}
