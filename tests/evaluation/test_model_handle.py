"""Where the evaluated model lives: on the GPU when there is one (a CPU-resident base made every GPU
evaluation run at CPU speed), on the CPU otherwise."""

import torch

from ecliptica.config import InferenceModelSection
from ecliptica.evaluation import model_handle
from ecliptica.evaluation.model_handle import ModelHandle, inference_device


def test_inference_device_is_the_gpu_when_one_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() == "cpu"


def test_load_places_the_base_on_the_inference_device(monkeypatch, tiny_model_dir):
    cfg = InferenceModelSection(name=str(tiny_model_dir), dtype="fp32")
    assert {p.device.type for p in ModelHandle.load(cfg).base.parameters()} == {"cpu"}  # no GPU here
    # "meta" stands in for a GPU on this CPU-only machine: load() must move the base to whatever
    # inference_device() answers, not leave it where from_pretrained put it (the CPU)
    monkeypatch.setattr(model_handle, "inference_device", lambda: "meta")
    assert {p.device.type for p in ModelHandle.load(cfg).base.parameters()} == {"meta"}
    assert {p.device.type for p in ModelHandle.load(cfg, device="cpu").base.parameters()} == {"cpu"}
