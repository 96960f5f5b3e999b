"""quipc.frontend.gguf_file: a GGUF read once per process gives what reading it afresh gives."""
from __future__ import annotations

import os

import pytest

from test_gguf_families import CASES, gguf_case


@pytest.mark.parametrize("case", list(CASES))
def test_top_module_map_equals_transformers_recursive_map(case):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map,
                                                          read_field)

    from quipc.frontend import gguf_file

    folder, path = gguf_case(case)
    config = gguf_file.config(path.parent, path.name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    reader = gguf_file.reader(path)
    arch = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = {t.name for t in reader.tensors}
    ours = {k: v for k, v in gguf_file.weights_map(model, processor).items() if k in names}
    theirs = {k: v for k, v in get_gguf_hf_weights_map(model, processor).items() if k in names}
    assert ours == theirs and len(ours) == len(names)


def test_reader_and_config_are_shared_and_follow_the_file(tmp_path):
    from quipc.frontend import gguf_file

    _, path = gguf_case("llama")
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    assert gguf_file.reader(copy) is gguf_file.reader(copy)
    a, b = gguf_file.config(tmp_path, copy.name), gguf_file.config(tmp_path, copy.name)
    assert a is not b and a.to_dict() == b.to_dict()
    a.vocab_size = -1                                   # a caller's change stays its own
    assert gguf_file.config(tmp_path, copy.name).vocab_size == b.vocab_size
    first = gguf_file.reader(copy)
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the file rewritten in place
    assert gguf_file.reader(copy) is not first


@pytest.mark.parametrize("keep", [0.02, 0.6])
def test_truncated_file_is_named(tmp_path, keep):
    """A GGUF cut short (in its metadata or in its tensors) is refused with one clear error
    naming the file, from the reader and from the config path that transformers parses."""
    from quipc.frontend import gguf_file

    _, path = gguf_case("llama")
    cut = tmp_path / path.name
    data = path.read_bytes()
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{cut.name} (is not a readable GGUF file|is truncated)"):
        gguf_file.reader(cut)
    with pytest.raises(ValueError, match=f"{cut.name} (is not a readable GGUF file|is truncated)"):
        gguf_file.config(tmp_path, cut.name)
