"""python -m pipeline.export: a TP x ZeRO-3 checkpoint consolidated on one process, without the original
world size, loads into TP=1 models that reproduce the live job's outputs, and into transformers' Data2Vec
models (with their preprocessors) that compute what ours computes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, torchrun
from pipeline import hf
from pipeline.data import raw_samples, resolve_shards
from pipeline.distributed import model_parallel_config
from pipeline.experiment import build_experiment
from pipeline.vocab import beside_manifest
from pipeline.model.data2vec import Backbone, Student
from pipeline.objective import teacher_targets
from test_hf_parity import assert_layers_equal, our_hidden_states

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("preset, shards", [
    ("configs/vision_tiny.yaml", "tiny_shards"),  # heads split, relative position bias split
    ("configs/speech_tiny.yaml", "tiny_audio_shards"),
    ("configs/text_tiny.yaml", "tiny_text_shards"),  # vocabulary-parallel embedding
])
def test_tp2_x_dp2_checkpoint_exports_to_our_model_and_to_transformers(single_process_group, request, tmp_path,
                                                                        preset, shards):
    """One TP 2 x DP 2 run (4 ranks) per modality. Its checkpoint, consolidated on one process, reproduces the
    live job's outputs in TP=1 models; exported with --format hf it loads in transformers (AutoModel and the
    preprocessor) with nothing missing or new, and computes our backbone's hidden states, also end to end
    from raw files."""
    manifest = request.getfixturevalue(shards)
    proc = torchrun([str(ROOT / "tests/dist/export_check.py"), str(tmp_path), preset, str(manifest), "2"], nproc=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    live = torch.load(tmp_path / "outputs.pt", weights_only=True)
    out = tmp_path / "consolidated.pt"
    cli = subprocess.run([sys.executable, "-m", "pipeline.export", live["ckpt"], "-o", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    exported = torch.load(out, weights_only=True)
    cfg = build_experiment(exported["config"])
    cfg.parallel.tp = 1
    modality = cfg.make_modality()
    mp = model_parallel_config(1)
    student, teacher = Student(modality, cfg.encoder, mp).eval(), Backbone(modality, cfg.encoder, mp).eval()
    student.load_state_dict(exported["student"], strict=False)
    teacher.load_state_dict(exported["teacher"], strict=False)
    assert set(exported["student"]) == {n for n, _ in student.named_parameters()}
    assert set(exported["teacher"]) == {n for n, _ in teacher.named_parameters()}
    with torch.no_grad():
        targets = teacher_targets(teacher(live["batch"]), cfg.objective)
        predictions = student(live["batch"], live["mask"])
    torch.testing.assert_close(targets, live["targets"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(predictions, live["predictions"], rtol=1e-4, atol=1e-4)
    assert exported["step"] == 3
    for weights, ours in (("student", student.backbone), ("teacher", teacher)):
        check_hf_export(live, cfg, ours, weights, manifest, tmp_path / f"hf_{weights}")
    # init.from at another TP (1, on 2 ranks): from the HF directory (the head keeps its own init: only the
    # teacher's targets are the source's) and from the .pt export (student with its head: predictions too; for
    # vision and text: its reader does nothing else for speech, and text re-pads the vocabulary from TP 2 to TP 1)
    sources = [(tmp_path / "hf_student", False)] + ([(out, True)] if "speech" not in preset else [])
    proc = torchrun([str(ROOT / "tests/dist/init_from_check.py"), str(tmp_path / "start"), preset, str(manifest), "1",
                     *(str(source) for source, _ in sources)], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for source, exact_head in sources:
        began = torch.load(tmp_path / "start" / source.name / "start.pt", weights_only=True)
        with torch.no_grad():
            want_targets = teacher_targets(student.backbone(began["batch"]), cfg.objective)
            want_predictions = student(began["batch"], began["mask"])
        torch.testing.assert_close(began["targets"], want_targets, rtol=1e-4, atol=1e-4)
        if exact_head:
            torch.testing.assert_close(began["predictions"], want_predictions, rtol=1e-4, atol=1e-4)


def check_hf_export(live, cfg, ours, weights, manifest, directory):
    """--format hf: AutoModel loads cleanly and equals ``ours`` on every layer, on the live (masked) batch and
    end to end from a raw sample through HF's preprocessor."""
    transformers = pytest.importorskip("transformers")
    from pipeline.export import main as export_main  # the CLI in this process (the .pt export ran it as one)
    assert export_main([live["ckpt"], "--format", "hf", "--weights", weights, "--output", str(directory)]) == 0
    model, info = transformers.AutoModel.from_pretrained(directory, output_loading_info=True)
    assert type(model).__name__ == hf.HF_MODEL_CLASS[cfg.modality]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    model.eval()
    batch, mask = live["batch"], live["mask"]
    kwargs = {"vision": lambda: {"pixel_values": batch["image"], "bool_masked_pos": mask},
              "speech": lambda: {"input_values": batch["audio"], "mask_time_indices": mask},
              "text": lambda: {"input_ids": batch["student_tokens"],
                               "attention_mask": batch["student_tokens"].ne(cfg.model.pad_id).long()}}[cfg.modality]()
    hidden, final = our_hidden_states(ours, batch, mask)
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    last = out.last_hidden_state[:, cfg.make_modality().prefix_tokens:]
    assert_layers_equal(hidden, out.hidden_states, final, last, tol=1e-4)
    # end to end: one raw shard sample, through our evaluation transform and through HF's preprocessor
    sample = next(raw_samples(resolve_shards(str(manifest))))
    inputs, their_inputs = end_to_end_inputs(cfg, directory, sample, transformers)
    _, want = our_hidden_states(ours, inputs, None)
    with torch.no_grad():
        got = model(**their_inputs).last_hidden_state
    diff = (want - got[:, cfg.make_modality().prefix_tokens:]).abs().max().item()
    assert diff <= 1e-4, f"end to end ({weights}): max abs diff {diff:.3g}"
    # feature extraction reads the HF directory (our config travels with it) as it reads the checkpoint
    from pipeline.features import load_backbone
    _, from_directory = load_backbone(directory)
    _, from_checkpoint = load_backbone(live["ckpt"], weights)
    with torch.no_grad():
        a = from_directory.encode(inputs, None)[0]
        b = from_checkpoint.encode(inputs, None)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def end_to_end_inputs(cfg, directory, sample, transformers):
    """(our inputs, HF's inputs) for one raw sample: our evaluation transform (text: the shards' sentencepiece
    model on the text) and the exported directory's HF preprocessor on the raw content."""
    import io

    import soundfile
    from PIL import Image
    modality = cfg.make_modality()
    if cfg.modality == "vision":
        image = Image.open(io.BytesIO(next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample)))
        processor = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
        pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return modality.eval_inputs(sample), {"pixel_values": pixels}
    if cfg.modality == "speech":
        wav, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        extractor = transformers.AutoFeatureExtractor.from_pretrained(directory)
        values = extractor(wav, sampling_rate=rate, return_tensors="pt")["input_values"]
        return modality.eval_inputs(sample), {"input_values": values}
    import sentencepiece
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(beside_manifest(cfg.data.manifest)))
    ids = np.frombuffer(sample["u16"], dtype="<u2").astype(np.int64)
    text = sp.decode([int(i) for i in ids if i != cfg.model.pad_id])  # the block's text
    encoded = tokenizer(text, return_tensors="pt")["input_ids"]
    assert encoded[0].tolist() == sp.encode(text)  # the shards' own sentencepiece ids
    return {"tokens": torch.tensor([sp.encode(text)])}, {"input_ids": encoded}


def test_export_rejects_an_incomplete_checkpoint(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    cli = subprocess.run([sys.executable, "-m", "pipeline.export", str(tmp_path / "step_00000001"), "-o",
                          str(tmp_path / "x.pt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "not a complete checkpoint" in cli.stderr
