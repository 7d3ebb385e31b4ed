"""Sliced GGUF files in llama.cpp's own programs: llama-server (chat with the file's template), llama-completion, llama-cli.

The programs come from scripts/build_llama_cpp.sh (build/llama.cpp/bin); their tests skip without them unless
SLICEGPT_REQUIRE_LLAMA_CPP=1.  Tiny models check the chat template and the server's life cycle in seconds; the
real SmolLM2-135M-Instruct sliced at 0.25 (q8_0) checks chat and greedy continuations (slow: it is sliced first).
Greedy continuations are compared as text: the server and the programs tokenize the prompt as the bindings'
`tokenize(add_bos=True, special=True)` does (the prompt token counts are compared too), and run with
`SAME_AS_BINDINGS` (f32 KV cache, no flash attention), so the same tokens come out.
"""

from __future__ import annotations

import json
import os

import gguf
import pytest
from tiny import CHAT_TEMPLATE, chat_tokenizer, tiny_hf_model

from slicegpt_export.converter.convert import slice_checkpoint
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.exporters.gguf import export_gguf
from slicegpt_export.validation.llama_cpp_tools import SAME_AS_BINDINGS, LlamaServer, complete, run_tool

THREADS = 1  # on a CPU shared with other work a second thread waiting at every barrier slows llama.cpp down
NEW_TOKENS = 32
CHAT_TOKENS = 48
PROMPT = "The history of the Roman Empire began when"
QUESTION = "What is the capital of France?"


def string_field(path, key: str) -> str | None:
    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else field.contents()


def tiny_chat_source(folder, template_in: str):
    """A tiny Llama HF folder with ChatML special tokens and template, the template where `template_in` says:
    chat_template.jinja (what transformers writes today) or tokenizer_config.json (older hub folders)."""
    model = tiny_hf_model("llama")
    model.config.bos_token_id, model.config.eos_token_id = 254, 255
    model.save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    if template_in == "tokenizer_config.json":
        (folder / "chat_template.jinja").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}))
    assert (folder / "chat_template.jinja").is_file() == (template_in == "chat_template.jinja")
    return folder


@pytest.fixture(scope="module", params=["chat_template.jinja", "tokenizer_config.json"])
def tiny_chat_gguf(request, tmp_path_factory, wikitext):
    root = tmp_path_factory.mktemp("tiny-chat")
    source = tiny_chat_source(root / "source", request.param)
    slice_checkpoint(model=str(source), out=root / "checkpoint", sparsity=0.25, calib=str(wikitext / "valid.txt"),
                     calib_samples=4, calib_seqlen=32, seed=0, device="cpu", progress=False)  # fmt: skip
    return source, export_gguf(checkpoint=root / "checkpoint", out=root / "gguf", gguf_type="f32")


def test_hf_chat_template_and_special_tokens_land_in_the_file(tiny_chat_gguf):
    _, path = tiny_chat_gguf
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 254
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 255
    tokens, types = reader.fields["tokenizer.ggml.tokens"].contents(), reader.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[254:] == ["<|im_start|>", "<|im_end|>"]
    assert types[254:] == [gguf.TokenType.CONTROL] * 2 and set(types[:254]) == {gguf.TokenType.NORMAL}


def test_llama_server_applies_the_files_chat_template(llama_cpp_tools, tiny_chat_gguf, tmp_path):
    _, path = tiny_chat_gguf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    want = chat_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with LlamaServer(path, log=tmp_path / "server.log", n_ctx=128, threads=THREADS) as server:
        props = server.get("/props")
        rendered = server.post("/apply-template", {"messages": messages})["prompt"]
    assert props["chat_template"] == CHAT_TEMPLATE
    assert rendered == want


def test_llama_server_is_stopped_and_reaped(llama_cpp_tools, tiny_chat_gguf, tmp_path):
    _, path = tiny_chat_gguf
    server = LlamaServer(path, log=tmp_path / "server.log", n_ctx=128, threads=THREADS)
    with server:
        assert server.get("/health") == {"status": "ok"}
        pid = server.process.pid
    assert server.process.returncode is not None  # exited and waited for
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_file_llama_server_cannot_load_is_a_one_line_error_and_no_process(llama_cpp_tools, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    server = LlamaServer(broken, log=tmp_path / "server.log", threads=THREADS, startup_timeout=30)
    with pytest.raises(SliceGPTError, match="llama-server exited with status"):
        server.start()
    assert server.process.returncode is not None


# --- the real model -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_q8_0(quarter_checkpoint, tmp_path_factory):
    """SmolLM2-135M-Instruct sliced at 0.25, exported to q8_0."""
    return export_gguf(checkpoint=quarter_checkpoint, out=tmp_path_factory.mktemp("smollm2-q8_0"), gguf_type="q8_0")


@pytest.fixture(scope="module")
def bindings(llama_cpp, smollm2_q8_0):
    from slicegpt_export.validation.llama_cpp_runner import LlamaCppModel

    model = LlamaCppModel(smollm2_q8_0, n_ctx=512, n_threads=THREADS)
    yield model
    model.close()


def bindings_greedy(model, prompt: str, max_new_tokens: int, *, stop_at_end: bool = False) -> tuple[list[int], str]:
    """The prompt's tokens as llama.cpp's programs make them (BOS when the vocabulary asks, special tokens parsed)
    and the greedy continuation's text."""
    ids = model.llm.tokenize(prompt.encode(), add_bos=True, special=True)
    return ids, model.llm.detokenize(model.greedy(ids, max_new_tokens, stop_at_end=stop_at_end)).decode()


@pytest.fixture(scope="module")
def rendered_chat(smollm2_path) -> str:
    """The chat prompt of QUESTION as transformers renders the source's template (SmolLM2's adds a system message)."""
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    return source.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def smollm2_server(llama_cpp_tools, smollm2_q8_0, tmp_path_factory):
    with LlamaServer(smollm2_q8_0, log=tmp_path_factory.mktemp("server") / "server.log", threads=THREADS) as server:
        yield server
    assert server.process.returncode is not None


@pytest.mark.slow
def test_the_gguf_sources_chat_template_travels_verbatim(smollm2_path, smollm2_q8_0):
    template = string_field(smollm2_q8_0, "tokenizer.chat_template")
    assert template is not None and "<|im_start|>" in template
    assert template == string_field(smollm2_path, "tokenizer.chat_template")


@pytest.mark.slow
def test_llama_server_chat_completion_is_the_templated_greedy_answer(smollm2_server, bindings, rendered_chat):
    answer = smollm2_server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}],
                                                          "max_tokens": CHAT_TOKENS, "temperature": 0})  # fmt: skip
    assert answer["object"] == "chat.completion" and answer["id"] and answer["model"] and answer["created"] > 0
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert 0 < answer["usage"]["completion_tokens"] <= CHAT_TOKENS
    # the server rendered the file's template as transformers renders the source's, and answered greedily
    ids, text = bindings_greedy(bindings, rendered_chat, CHAT_TOKENS, stop_at_end=True)
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert choice["message"]["content"] == text


@pytest.mark.slow
def test_llama_server_completion_is_the_bindings_greedy_continuation(smollm2_server, bindings):
    ids, text = bindings_greedy(bindings, PROMPT, NEW_TOKENS)
    answer = smollm2_server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0,
                                                     "ignore_eos": True, "cache_prompt": False})  # fmt: skip
    assert answer["usage"]["prompt_tokens"] == len(ids) and answer["usage"]["completion_tokens"] == NEW_TOKENS
    assert answer["choices"][0]["text"] == text


@pytest.mark.slow
def test_llama_completion_is_the_bindings_greedy_continuation(llama_cpp_tools, smollm2_q8_0, bindings):
    _, text = bindings_greedy(bindings, PROMPT, NEW_TOKENS)
    assert complete(smollm2_q8_0, PROMPT, NEW_TOKENS, threads=THREADS) == text


@pytest.mark.slow
def test_llama_cli_single_turn_answers_as_the_server_does(llama_cpp_tools, smollm2_q8_0, bindings, rendered_chat, tmp_path):
    _, text = bindings_greedy(bindings, rendered_chat, CHAT_TOKENS, stop_at_end=True)
    run_tool("llama-cli", ["--model", str(smollm2_q8_0), "--prompt", QUESTION, "--single-turn", "--n-predict", str(CHAT_TOKENS),
                           "--temp", "0", "--ctx-size", "512", "--threads", str(THREADS), *SAME_AS_BINDINGS,
                           "--output-file", str(tmp_path / "chat.txt")], timeout=120)  # fmt: skip
    # llama-cli writes the conversation: the user's turn, then the answer ending in one newline, then a blank line
    answer = text if text.endswith("\n") else text + "\n"
    assert (tmp_path / "chat.txt").read_text() == f"User:\n{QUESTION}\n\nAssistant:\n{answer}\n"


def test_run_tool_reports_a_failing_program(llama_cpp_tools, tmp_path):
    with pytest.raises(SliceGPTError, match="llama-completion failed with exit status"):
        run_tool("llama-completion", ["--model", str(tmp_path / "missing.gguf"), "--prompt", "x"], timeout=60)
