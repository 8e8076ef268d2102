# ruff: noqa: F401, F811  (pytest injects the `candidate` fixture imported from test_publish)
"""The test Hub says no where the Hub says no, and each refusal reaches the operator as an
error that names the setting to fix (requant.hub.client.hub_errors), before anything is
promoted. The real huggingface_hub client is on the other end of every call."""

from __future__ import annotations

import httpx
import pytest

from requant.errors import PublishError, is_transient
from requant.hub.cardcheck import check_card_on_hub
from requant.hub.client import hub_api, hub_errors
from requant.hub.commits import ensure_tag
from requant.hub.marker import production_revision
from requant.settings import HubSettings
from tests.fakehub import FakeHub
from tests.test_publish import REPO, TOKEN, candidate, run_publish

READ_TOKEN = "hf_readonlyTESTtoken0123456789"


@pytest.fixture
def hub(tmp_path):
    with FakeHub(TOKEN, tmp_path / "hub-storage", read_token=READ_TOKEN) as server:
        yield server


def settings(hub, **kwargs) -> HubSettings:
    return HubSettings(repo_id=REPO, endpoint=hub.endpoint, **kwargs)


def test_read_only_token_gets_403_and_is_told_to_use_a_write_token(hub, candidate, tmp_path):
    with pytest.raises(PublishError, match=r"may not write to acme/tiny-w8a8 \(403.*read-only"
                       r".*Use a token with write access to acme") as err:
        run_publish(hub, candidate, tmp_path / "publish", token=READ_TOKEN)
    assert err.value.status == 403 and not is_transient(err.value)
    assert REPO not in hub.state.repos and hub.state.lfs_bytes_received == 0


def test_private_repo_is_invisible_without_a_token_and_the_error_says_so(hub, candidate,
                                                                          tmp_path, monkeypatch):
    run_publish(hub, candidate, tmp_path / "publish")  # private by default
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishError, match=r"hub\.repo_id acme/tiny-w8a8 does not exist or the "
                       r"token cannot see it \(a private repo"):
        production_revision(settings(hub), token=None)
    assert production_revision(settings(hub), token=READ_TOKEN) is None  # a reader may read


def test_commit_to_a_branch_that_does_not_exist_is_404_naming_hub_branch(hub, candidate,
                                                                          tmp_path):
    with pytest.raises(PublishError, match=r"hub\.branch is 'release': create that branch"):
        run_publish(hub, candidate, tmp_path / "publish", branch="release")
    assert hub.state.commit_count(REPO) == 0 and "release" not in hub.state.repos[REPO].branches


def test_refs_follow_the_hub_rules_main_stays_unknown_revisions_404_tags_409(hub, candidate,
                                                                              tmp_path):
    result = run_publish(hub, candidate, tmp_path / "publish")
    api, s = hub_api(settings(hub), TOKEN), settings(hub)
    with pytest.raises(PublishError, match=r"403"), hub_errors(s, "delete main"):
        api.delete_branch(REPO, branch="main")
    with pytest.raises(PublishError, match=r"revision does not exist"), hub_errors(s, "branch"):
        api.create_branch(REPO, branch="x", revision="f" * 40)
    with pytest.raises(PublishError, match=r"revision does not exist"), hub_errors(s, "delete"):
        api.delete_branch(REPO, branch="no-such-branch")
    assert "main" in hub.state.repos[REPO].branches
    # the candidate's own tag, asked again, is success (a racing publish created it) ...
    assert ensure_tag(api, s, result.tag, result.commit_sha, result.content_digest) == result.tag
    # ... while its name on another commit is not "mine": immutable, the error says what to do
    initial = next(c.sha for c in hub.state.repos[REPO].commits.values() if c.parent is None)
    api.delete_tag(REPO, tag=result.tag)
    api.create_tag(REPO, tag=result.tag, revision=initial)
    with pytest.raises(PublishError, match=rf"tag {result.tag} already exists on commit "
                       rf"{initial}, not on .* delete the stray tag"):
        ensure_tag(api, s, result.tag, result.commit_sha, result.content_digest)


def test_lfs_uploads_need_the_signed_url_and_exactly_the_declared_size(hub):
    data = b"x" * 1000
    import hashlib

    oid = hashlib.sha256(data).hexdigest()
    unsigned = httpx.put(f"{hub.endpoint}/lfs-upload/{oid}?size=1000", content=data)
    assert unsigned.status_code == 403
    sig = hub.state.sign(oid, 1000)
    short = httpx.put(f"{hub.endpoint}/lfs-upload/{oid}?size=1000&sig={sig}", content=data[:900])
    assert short.status_code == 400 and "declared 1000" in short.headers["X-Error-Message"]
    batch = httpx.post(f"{hub.endpoint}/{REPO}.git/info/lfs/objects/batch",
                       json={"operation": "upload", "objects": [{"oid": oid, "size": 1000}]})
    assert batch.status_code == 401  # the batch (which hands out URLs) needs a write token
    assert oid not in hub.state.objects


def test_commit_shas_derive_from_content_and_parent(hub):
    from huggingface_hub import CommitOperationAdd

    api = hub_api(settings(hub), TOKEN)

    def commit(repo: str, content: bytes = b"same") -> str:
        api.create_repo(repo, exist_ok=True)
        return api.create_commit(repo, [CommitOperationAdd("a.txt", content)],
                                 commit_message="same").oid

    first = commit("acme/one")
    assert commit("acme/two") == first  # same tree on the same parent (the initial commit)
    commit("acme/three", b"before")
    assert commit("acme/three") != first  # the same tree on another parent: another commit


@pytest.mark.parametrize(("metadata", "refusal"), [
    ("license: not-a-license", '"license" must be one of'),
    ("license: other", '"license_name" is required'),
    ("pipeline_tag: text-genration", '"pipeline_tag" must be one of'),
    ("base_model: ./models/local", '"base_model" with value "./models/local" is not valid'),
    ("base_model_relation: quantised\nbase_model: acme/tiny-llama",
     '"base_model_relation" must be one of'),
    ("base_model_relation: quantized", '"base_model_relation" requires "base_model"'),
    ("model-index:\n- name: x\n  results:\n  - task: {}\n    dataset: {type: gsm8k}\n    "
     "metrics: [{type: acc}]", '"model-index[0].results[0].task.type" is required'),
])
def test_card_metadata_the_hub_would_refuse_is_refused_before_upload_naming_the_field(
        hub, metadata, refusal):
    card = f"---\n{metadata}\n---\n\n# card\n"
    with pytest.raises(PublishError, match="metadata validation refused it") as err:
        check_card_on_hub(card, settings(hub), hub.endpoint, TOKEN)
    assert refusal in str(err.value)
    check_card_on_hub("---\nlicense: apache-2.0\nbase_model: acme/tiny-llama\n"
                      "base_model_relation: quantized\npipeline_tag: text-generation\n---\n",
                      settings(hub), hub.endpoint, TOKEN)  # and a valid one passes
