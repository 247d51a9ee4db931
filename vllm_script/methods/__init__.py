"""Pruning methods: the selection API (which tokens to keep), usable without vLLM.

    from vllm_script.methods import script_select, trim_select, apply_selection

Every `*_select` function takes a batch of B images of N tokens each and a budget k and
returns a `Selection` of exactly min(k, N) rows per image:

- `keep` [B, K_keep]: indices of the kept tokens in the order the LLM receives them,
  ascending (original order) unless `reference="code"` reproduces another order;
- `kept_values` [B, K_keep, D] or None: replacement rows for the kept tokens (PruMerge+
  merges neighbours into them), None = gather the kept tokens as they are;
- `extra` [B, M, D] or None: tokens the method made (TRIM's aggregate, PruMerge+'s
  remainder token), appended after the kept ones;
- `info`: diagnostics, e.g. `info["iqr_count"]` (TRIM, PruMerge+): how many tokens the
  paper's adaptive IQR rule would have kept, to choose fixed budgets offline.

`apply_selection(tokens, selection)` -> [B, K, D] builds the rows the model receives.

`reference="paper"` (default) follows each method's paper; `reference="code"` selects
exactly what the authors' released code selects on the same inputs (README, "Fidelity").

Inputs are named by what they are:

| function               | inputs                                                      | space |
|------------------------|-------------------------------------------------------------|-------|
| `script_select`        | `features` [B,N,D], `relevance` [B,N] or None               | LLM   |
| `qcsp_select`          | `features`, `relevance`                                     | LLM   |
| `gsp_select`           | `features`                                                  | LLM   |
| `divprune_select`      | `features`                                                  | LLM   |
| `uniform_select`       | `num_tokens`, `grid` (h, w) or None                         | any   |
| `trim_select`          | `features` [B,N,Dv], `clip_image_embeds` [B,N,E],           | vision|
|                        | `clip_text_embeds` [B,E] or [B,T,E]                         |       |
| `prumerge_plus_select` | `features` [B,N,Dv], `keys` [B,N,Dk], `cls_attention` [B,N],| vision|
|                        | `grid`                                                      |       |

"LLM" = post-projector tokens (what the LLM receives); "vision" = pre-projector patch
features, whose kept / merged / extra rows the caller then projects. Relevance helpers:
`llm_relevance` (question's LLM input embeddings, the `llm` source), `clip_relevance`
(CLIP image vs text embeddings, the `clip` source), `cls_attention_from_qk` (PruMerge+'s
CLS attention recomputed from a vision layer's q / k).
"""

from vllm_script.methods.base import Selection, apply_selection
from vllm_script.methods.clip_relevance import clip_relevance, min_max
from vllm_script.methods.divprune import divprune_select
from vllm_script.methods.gsp import gsp_select
from vllm_script.methods.prumerge import cls_attention_from_qk, prumerge_plus_select
from vllm_script.methods.qcsp import qcsp_select
from vllm_script.methods.script import script_select
from vllm_script.methods.trim import iqr_outliers, trim_scores, trim_select
from vllm_script.methods.uniform import uniform_indices, uniform_select
from vllm_script.relevance import llm_relevance

__all__ = [
    "Selection",
    "apply_selection",
    "clip_relevance",
    "cls_attention_from_qk",
    "divprune_select",
    "gsp_select",
    "iqr_outliers",
    "llm_relevance",
    "min_max",
    "prumerge_plus_select",
    "qcsp_select",
    "script_select",
    "trim_scores",
    "trim_select",
    "uniform_indices",
    "uniform_select",
]
