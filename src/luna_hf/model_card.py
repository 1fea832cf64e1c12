"""Model cards for the folders that the luna-hf scripts save: `README.md` written next to the weights at save time,
so that a local folder and its Hub copy carry the same card (what it is, the data, the metrics this run measured,
how to load it, its limitations). `scripts/finetune_glue.py` fills its own, richer GLUE template the same way."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# What a learned-kernel model's card says its attention is; scripts/finetune_glue.py's GLUE card uses it too.
LEARNED_KERNEL_DESCRIPTION = (
    'Its attention is the learned-kernel linear attention of "LUNA: Linear Universal Neural Attention" (Shahbazi et '
    "al., 2025, arXiv:2512.08061), in luna-hf's Luna model (`attention_type=\"learned_kernel\"`): each layer's softmax "
    "is replaced by φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1) with a learned feature map φ, at a cost linear in the length, and "
    "there is no extra sequence P. It is unrelated to Luna (*Linear Unified Nested Attention*, Ma et al., 2021), "
    "whose nested attention it replaces."
)

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}
{% if is_learned_kernel %}
{{ learned_kernel_description }}
{% elif is_luna %}
Luna (*Linear Unified Nested Attention*, Ma et al., NeurIPS 2021, arXiv:2106.01540) is an encoder used like RoBERTa
whose attention costs O(n·l) instead of O(n²): a short extra sequence P of l = {{ projected_length }} slots packs the
input with one attention and unpacks it with a second. It is unrelated to "LUNA: Linear Universal Neural Attention"
(Shahbazi et al., 2025), a learned-kernel linear attention.
{% endif %}
## Data

{{ data }}

## Metrics measured by this run
{% if metrics %}
| metric | value |
|---|---:|
{%- for name, value in metrics %}
| {{ name }} | {{ value }} |
{%- endfor %}
{% else %}
None: {{ no_metrics_reason }}
{% endif %}
## Use
{% if load_class %}
{% if is_luna %}The folder carries its model code (`auto_map`), so `transformers` alone loads it:{% else %}A
`transformers` model (no custom code):{% endif %}

```python
from transformers import {{ load_class }}

model = {{ load_class }}.from_pretrained("{{ model_id }}", trust_remote_code=True)
```
{% if has_tokenizer %}
and its tokenizer with `AutoTokenizer.from_pretrained("{{ model_id }}", trust_remote_code=True)`.
{% endif %}{% else %}
{{ usage }}
{% endif %}
## Limitations
{% for line in limitations %}
- {{ line }}
{%- endfor %}

Made with luna-hf's `{{ script }}`.
"""


def format_metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_model_card(
    folder,
    *,
    title: str,
    summary: str,
    script: str,
    load_class: str | None,
    data: str,
    metrics: dict,
    limitations: list[str],
    config=None,
    tags: tuple[str, ...] = (),
    pipeline_tag: str | None = None,
    datasets: list[str] | None = None,
    task_type: str | None = None,
    dataset_name: str | None = None,
    no_metrics_reason: str = "this script measures none.",
    model_id: str | None = None,
    usage: str = "",
) -> ModelCard:
    """Render the card and write it to `folder/README.md`; also returned, for pushing. `metrics` maps names to values
    (floats appear with 4 decimals); with `task_type` and `dataset_name` they also go into the card's model-index.
    A folder that no Auto class loads has `load_class=None` and says how to load it in `usage`."""
    folder = Path(folder)
    numeric = {name: float(value) for name, value in metrics.items() if isinstance(value, int | float)}
    eval_results = None
    if task_type and dataset_name and numeric:
        eval_results = [
            EvalResult(task_type=task_type, dataset_type=dataset_name, dataset_name=dataset_name, metric_type=name,
                       metric_value=value)
            for name, value in numeric.items()
        ]  # fmt: skip
    is_luna = getattr(config, "model_type", None) == "luna"
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["luna-hf", *(["luna"] if is_luna else []), *tags],
        datasets=datasets,
        model_name=model_id or folder.name,
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        title=title,
        summary=summary,
        is_luna=is_luna,
        is_learned_kernel=is_luna and getattr(config, "attention_type", "nested") == "learned_kernel",
        learned_kernel_description=LEARNED_KERNEL_DESCRIPTION,
        projected_length=getattr(config, "projected_length", None),
        data=data,
        metrics=[(name, format_metric(value)) for name, value in metrics.items()],
        no_metrics_reason=no_metrics_reason,
        load_class=load_class,
        usage=usage,
        model_id=model_id or str(folder),
        has_tokenizer=(folder / "tokenizer_config.json").is_file(),
        limitations=limitations,
        script=script,
    )
    card.save(folder / "README.md")
    return card
