"""`nsa-serve init-model` and `nsa-serve generate` as a user runs them."""

import subprocess
import sys

import pytest

from nsa_serve.tokenizer import Tokenizer, render_chat


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "nsa_serve.cli", "init-model", "--preset", "tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


def generate(model_dir, *args):
    proc = subprocess.run([sys.executable, "-m", "nsa_serve.cli", "generate", "--model", str(model_dir), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_generate_streams_text_and_is_reproducible(model_dir):
    greedy = generate(model_dir, "--prompt", "The function returns", "--max-tokens", "12", "--ignore-eos")
    assert greedy.strip() and greedy == generate(model_dir, "--prompt", "The function returns",
                                                 "--max-tokens", "12", "--ignore-eos")
    a = generate(model_dir, "--prompt", "Hello", "--max-tokens", "12", "--temperature", "0.9", "--seed", "1",
                 "--ignore-eos", "--chat")
    b = generate(model_dir, "--prompt", "Hello", "--max-tokens", "12", "--temperature", "0.9", "--seed", "1",
                 "--ignore-eos", "--chat")
    assert a == b


def test_model_directory_layout(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json"):
        assert (model_dir / name).is_file()
    tok = Tokenizer(model_dir / "tokenizer.model")
    text = "Unicode ✓ naïve 😀 and <|end|> markers"
    assert tok.decode(tok.encode(text)) == text


def test_chat_template():
    prompt = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "wizard", "content": "x"}])
    # continue_final_message: the last message left open for the model to continue.
    start = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    assert render_chat(start, add_generation_prompt=False, continue_final_message=True) == \
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello, I"
    with pytest.raises(ValueError, match="add_generation_prompt"):
        render_chat(start, continue_final_message=True)


def test_commands_work_without_the_server_packages():
    # A GPU image may lack uvicorn: the commands that need it say so, the others (bench) still parse
    # and run. run-batch imported the server's CLI while registering, which broke every command.
    code = ("import sys; sys.modules['uvicorn'] = None\n"
            "from nsa_serve.cli import main\n"
            "a = main.__globals__['build_parser']().parse_args(['bench', '--preset', 'tiny'])\n"
            "print('bench parses', a.preset)\n"
            "for cmd in ('serve', 'run-batch'):\n"
            "    try:\n"
            "        main([cmd])\n"
            "    except SystemExit as e:\n"
            "        print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "bench parses tiny"
    assert lines[1] == lines[2].replace("run-batch", "serve") and "needs the Python package 'uvicorn'" in lines[1]
