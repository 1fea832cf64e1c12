"""Luna reading images: LunaForImageClassification and the conversion of a fine-tuned ViT (docs/vision.md), on tiny
random ViTs. What carries over is checked against ViT itself: with softmax attention put back into the converted
layers (from the projections they copied), the converted model must compute ViT's logits."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel, pipeline

import luna_hf
from luna_hf import LunaConfig, LunaForImageClassification
from luna_hf.conversion import ConversionError, is_transferred_parameter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_fixture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convert_script", ROOT / "scripts" / "convert_to_luna.py")
convert_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_script)
LABELS = {0: "cat", 1: "dog", 2: "bird"}


def tiny_vit(model_class=ViTForImageClassification, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, initializer_range=0.2, id2label=LABELS,
                       label2id={v: k for k, v in LABELS.items()}, **overrides)  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():  # LayerNorms, biases away from 1 and 0, positions and [CLS] sizeable: a misplaced one shows
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "token" in name or "position" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    return model


def softmax_attention(query, key, value, output, heads):
    """A plain softmax attention over X from given projections: what ViT computes, written here."""

    def attend(states):
        split = [projection(states).unflatten(-1, (heads, -1)).transpose(1, 2) for projection in (query, key, value)]
        weights = torch.softmax(split[0] @ split[1].mT / split[0].shape[-1] ** 0.5, dim=-1)
        return output((weights @ split[2]).transpose(1, 2).flatten(2))

    return attend


def with_softmax_attention(model: LunaForImageClassification):
    """Each layer's attention replaced by softmax attention from the ViT projections the conversion copied (nested:
    the pack attention's key and value, the unpack attention's query and output)."""
    heads = model.config.num_attention_heads
    for layer in model.luna.layers:
        if model.config.attention_type == "learned_kernel":
            parts = layer.attention
            attend = softmax_attention(parts.q_proj, parts.k_proj, parts.v_proj, parts.o_proj, heads)
        else:
            pack, unpack = layer.pack_attention, layer.unpack_attention
            attend = softmax_attention(unpack.q_proj, pack.k_proj, pack.v_proj, unpack.o_proj, heads)
        layer.attend = lambda states, packed, *args, attend=attend, **kwargs: (attend(states), packed)
    return model


@pytest.mark.parametrize("attention", ["learned_kernel", "nested"])
def test_a_converted_vit_computes_vits_logits_with_softmax_put_back(attention):
    vit = tiny_vit()
    luna = luna_hf.convert_to_luna(vit, attention=attention, projected_length=4)
    assert type(luna) is LunaForImageClassification and luna.config.id2label == LABELS
    pixel_values = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vit(pixel_values=pixel_values, output_hidden_states=True)
        converted = luna(pixel_values=pixel_values, output_hidden_states=True)
        torch.testing.assert_close(converted.hidden_states[0], expected.hidden_states[0], rtol=0, atol=0)  # embeddings
        assert not torch.allclose(converted.logits, expected.logits, atol=1e-3)  # the new attention is not softmax
        softmax_logits = with_softmax_attention(luna)(pixel_values=pixel_values).logits
    torch.testing.assert_close(softmax_logits, expected.logits, rtol=1e-4, atol=1e-5)


def test_positions_interpolate_as_vits_and_wrong_images_are_refused():
    vit = tiny_vit()
    luna = luna_hf.convert_to_luna(vit, attention="learned_kernel")
    larger = torch.randn(2, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vit(pixel_values=larger, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[0]
        actual = luna(pixel_values=larger, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[0]
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        assert luna(pixel_values=larger, interpolate_pos_encoding=True).logits.shape == (2, 3)
    for images, message in [
        (larger, r"The image is 24x32; this model's positions are for 16x16 \(config.image_size\).*"
                 r"interpolate_pos_encoding=True"),
        (torch.randn(2, 1, 16, 16), r"pixel_values have 1 channels; this model reads 3"),
        (torch.randn(2, 3, 18, 16), r"not a whole number of 4x4 patches"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.long), r"must be a non-empty float tensor"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            luna(pixel_values=images)
    with pytest.raises(ValueError, match="pass pixel_values only"):
        luna.luna(input_ids=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="LunaForImageClassification reads images: set config.image_size"):
        LunaForImageClassification(LunaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4))


def test_unsupported_vision_models_are_refused_before_anything_is_written(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, SwinConfig, SwinForImageClassification

    swin = SwinForImageClassification(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[2],
                                                 window_size=2))  # fmt: skip
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                            num_hidden_layers=1, num_attention_heads=4,
                                                            intermediate_size=64))  # fmt: skip
    for model, message in [(swin, "SwinForImageClassification.*not Swin's windows"),
                           (deit, "DeiTForImageClassificationWithTeacher.*not DeiT's distillation token")]:  # fmt: skip
        with pytest.raises(ConversionError, match=message):
            luna_hf.convert_to_luna(model)
        model.save_pretrained(tmp_path / type(model).__name__)
        with pytest.raises(SystemExit, match=message):
            convert_script.main(["--model_name_or_path", str(tmp_path / type(model).__name__), "--output_dir",
                                 str(tmp_path / "out")])  # fmt: skip
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="A ViT reads images, not tokens"):
        luna_hf.convert_to_luna(tiny_vit(), tokenizer=object())
    with pytest.raises(ConversionError, match="interpolate_pos_encoding"):
        luna_hf.convert_to_luna(tiny_vit(), max_position_embeddings=100)


def save_vit_folder(folder):
    tiny_vit().save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


@pytest.mark.parametrize("attention", ["learned_kernel", "nested"])
def test_the_converted_folder_serves_the_image_classification_pipeline_and_remote_code(tmp_path, attention):
    from PIL import Image

    source = save_vit_folder(tmp_path / "vit")
    convert_script.main(["--model_name_or_path", str(source), "--output_dir", str(tmp_path / "luna"), "--attention",
                         attention, "--projected_length", "4"])  # fmt: skip
    assert (tmp_path / "luna" / "preprocessor_config.json").is_file()
    assert "Images of 16x16 pixels" in (tmp_path / "luna" / "README.md").read_text()
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8))
              for seed in range(2)]  # fmt: skip
    classifier = pipeline("image-classification", model=str(tmp_path / "luna"), trust_remote_code=True)
    answers = classifier(images, top_k=3)
    model = LunaForImageClassification.from_pretrained(tmp_path / "luna").eval()
    processor = ViTImageProcessor.from_pretrained(tmp_path / "luna")
    with torch.no_grad():
        probabilities = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    for answer, row in zip(answers, probabilities, strict=True):
        assert {item["label"] for item in answer} == set(LABELS.values())
        for item in answer:
            label = {name: index for index, name in LABELS.items()}[item["label"]]
            assert item["score"] == pytest.approx(row[label].item(), abs=1e-5)

    # Where luna_hf is not installed: the folder's own code, the same logits.
    result = hub_fixture.run_python(textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "luna")!r}, trust_remote_code=True)
        pixel_values = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
        with torch.no_grad():
            logits = model(pixel_values=pixel_values).logits.tolist()
        print(json.dumps({{"module": type(model).__module__, "logits": logits}}))
    """), env=hub_fixture.clean_env(tmp_path / "hf_home", HF_HUB_OFFLINE=1), without_luna_hf=True)  # fmt: skip
    assert not result["module"].startswith("luna_hf")
    with torch.no_grad():
        expected = model(pixel_values=torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-6)


def test_attention_transfer_on_images_lowers_the_loss_and_trains_only_the_new_attention():
    vit = tiny_vit(ViTModel)
    student = luna_hf.convert_to_luna(vit, attention="learned_kernel")
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    images = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    result = luna_hf.transfer_attention(student, vit, images, max_steps=24, batch_size=8, learning_rate=1e-2)
    assert sum(result.layer_losses[-1]) < sum(result.layer_losses[0])
    changed = {name for name, tensor in student.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(is_transferred_parameter(name, "learned_kernel") for name in changed)
    with pytest.raises(ValueError, match="must be a non-empty float tensor"):
        luna_hf.transfer_attention(student, vit, torch.zeros(0, 3, 16, 16))


def test_a_vit_without_query_key_value_biases_converts_with_zero_biases():
    vit = tiny_vit(qkv_bias=False)
    luna = luna_hf.convert_to_luna(vit, attention="learned_kernel")
    assert all(torch.equal(layer.attention.q_proj.bias, torch.zeros(32)) for layer in luna.luna.layers)
    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(with_softmax_attention(luna)(pixel_values=pixel_values).logits,
                                   vit(pixel_values=pixel_values).logits, rtol=1e-4, atol=1e-5)  # fmt: skip


def test_image_classification_head_learns_a_tiny_batch_and_round_trips(tmp_path):
    config = LunaConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, projected_length=3, normalize_before=True,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = LunaForImageClassification(config)
    pixel_values, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.2 * first
    expected = nn.functional.cross_entropy(model(pixel_values=pixel_values).logits, labels)
    torch.testing.assert_close(model(pixel_values=pixel_values, labels=labels).loss, expected)
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"][
        "AutoModelForImageClassification"] == "modeling_luna.LunaForImageClassification"  # fmt: skip
    reloaded = LunaForImageClassification.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, model.eval()(pixel_values).logits)


def test_what_an_image_model_cannot_do_is_refused_with_what_to_do(tmp_path):
    fixed = luna_hf.convert_to_luna(tiny_vit(ViTModel), kernel_feature_map="elu_plus_one")
    with pytest.raises(ValueError, match="nothing new to train.*without a transfer"):
        luna_hf.transfer_attention(fixed, tiny_vit(ViTModel), torch.randn(64, 3, 16, 16))
    with pytest.raises(ValueError, match='feature map of the learned-kernel attention: set attention_type="learned'):
        luna_hf.convert_to_luna(tiny_vit(), attention="nested", kernel_feature_map="elu_plus_one")
    luna = luna_hf.convert_to_luna(tiny_vit())
    projection = nn.Conv2d(3, 32, 4, stride=4)
    luna.set_input_embeddings(projection)
    assert luna.get_input_embeddings() is projection and luna.luna.embeddings.projection is projection
    luna.save_pretrained(tmp_path / "luna")
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "scripts" / "export_onnx.py")
    export_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_script)
    with pytest.raises(SystemExit, match="is an image model; this script exports text models"):
        export_script.main(["--model_name_or_path", str(tmp_path / "luna"), "--output_dir", str(tmp_path / "onnx")])
    assert not (tmp_path / "onnx").exists()
