"""The model card's metadata, checked as the Hub checks it, before any commit.

Two layers: huggingface_hub's own parser (``ModelCard``: the YAML block, ``model-index`` to
eval results, ``validate_repo_id`` for every ``base_model``) runs offline, dry runs included;
then the Hub's ``/api/validate-yaml`` judges it with the Hub's own rules. ``ModelCard.validate``
sends the same request but always to huggingface.co, so it is sent here to the configured
endpoint. A card the Hub would refuse fails the publish before a byte is uploaded.
"""

from __future__ import annotations

from requant.errors import PublishError
from requant.settings import HubSettings


def check_card_locally(card: str) -> None:
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        data = ModelCard(card).data
    except Exception as exc:  # the parser raises ValueError/KeyError/TypeError on bad metadata
        raise PublishError(f"model card: its metadata does not parse ({exc}); this is a bug in "
                           "requant's card template, please report it") from exc
    bases = data.base_model if isinstance(data.base_model, list) else \
        [data.base_model] if data.base_model else []
    for base in bases:
        try:
            validate_repo_id(base)
        except HFValidationError as exc:
            raise PublishError(f"model card: base_model {base!r} is not a Hub model id ({exc}). "
                               "Set source.hub_id to the id the local model came from.") from exc
    if getattr(data, "base_model_relation", None) and not bases:
        raise PublishError("model card: base_model_relation without base_model; this is a bug "
                           "in requant's card template, please report it")


def check_card_on_hub(card: str, hub: HubSettings, endpoint: str, token: str | None) -> None:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers(token=token) | {"Accept": "text/plain"}
    response = get_session().post(f"{endpoint}/api/validate-yaml", headers=headers,
                                  json={"repoType": "model", "content": card})
    if response.status_code == 400:
        raise PublishError(
            f"model card for {hub.repo_id}: the Hub's metadata validation refused it: "
            f"{response.text.strip()}. base_model comes from source.model (a Hub id) or "
            "source.hub_id (for a local directory).", 400)
    hf_raise_for_status(response)
