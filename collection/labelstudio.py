"""Label Studio through its SDK (label-studio-sdk): the pairwise labeling configuration, pushing comparison items
into a project, pulling the project's JSON export.

The API key is read from LABEL_STUDIO_API_KEY and nowhere else, handed to the SDK, and never written or printed.
Both kinds Label Studio 1.23 issues work: a personal access token (a JWT; the SDK trades it for short-lived access
tokens) and a legacy token (when the organisation has them enabled).
"""
from __future__ import annotations

import json
import os

from core.errors import ConfigError

API_KEY_ENV = "LABEL_STUDIO_API_KEY"

# The conversation above, the two answers side by side under Label Studio's Pairwise tag (a click picks one),
# and one choice for "neither": a tie or both bad.
LABEL_CONFIG = """<View>
  <Header value="Conversation"/>
  <Paragraphs name="conversation" value="$conversation" layout="dialogue" nameKey="role" textKey="content"/>
  <Header value="Which answer is better? Click it."/>
  <Pairwise name="preference" toName="answer_a,answer_b" selectionStyle="background-color: #c8f0c8"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1; padding: 0.5em; border: 1px solid #ccc;">
      <Header value="Answer A" size="5"/>
      <Text name="answer_a" value="$answer_a"/>
    </View>
    <View style="flex: 1; padding: 0.5em; border: 1px solid #ccc;">
      <Header value="Answer B" size="5"/>
      <Text name="answer_b" value="$answer_b"/>
    </View>
  </View>
  <Choices name="verdict" toName="answer_a" choice="single" showInline="true">
    <Choice value="Tie"/>
    <Choice value="Both bad"/>
  </Choices>
</View>"""


def api_key() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ConfigError(f"{API_KEY_ENV} is not set",
                          why="raydpo reads the Label Studio API key from the environment only",
                          fix=f"export {API_KEY_ENV}=<a personal access token (Account & Settings) or legacy token>")
    return key


def client(url: str):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key(), timeout=120)


def _service_error(url: str, err: Exception) -> ConfigError:
    status = getattr(err, "status_code", None)
    if status in (401, 403):
        return ConfigError(f"Label Studio at {url} refused the API key ({status})",
                           why=str(getattr(err, "body", "")) or "the token is wrong, expired or revoked",
                           fix=f"create a new token in Label Studio (Account & Settings) and set {API_KEY_ENV}; "
                               "a legacy token works only where the organisation enabled legacy tokens")
    if status is not None:
        return ConfigError(f"Label Studio at {url} answered {status}", why=str(getattr(err, "body", ""))[:500])
    return ConfigError(f"cannot reach Label Studio at {url}", why=f"{type(err).__name__}: {err}",
                       fix="check --label-studio (scheme, host and port) and that the server is running")


def _calling(url: str, action):
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return action()
    except (ApiError, httpx.HTTPError) as err:
        raise _service_error(url, err) from err


def comparison_key(data: dict) -> tuple:
    """What makes a comparison the same one on a re-push: its prompt's id and its two answers in either order.

    Not the pair's indices: the next round samples new candidates for the same prompts (the same ids), and those
    pairs are new even when pushed into the same project."""
    return data.get("raydpo_task"), tuple(sorted((data.get("answer_a") or "", data.get("answer_b") or "")))


def find_project(ls, title: str):
    return next((p for p in ls.projects.list(title=title) if p.title == title), None)


def push(items: list[dict], url: str, title: str) -> dict:
    """Create the project (or reuse the one with this title) and import the items it does not hold yet.

    Returns {"project", "created", "imported", "already_there"}.
    """
    ls = client(url)

    def run():
        project = find_project(ls, title)
        created = project is None
        if created:
            project = ls.projects.create(title=title, label_config=LABEL_CONFIG,
                                         description="raydpo preference collection: pick the better answer")
            held = set()
        else:
            held = {comparison_key(t.get("data") or {}) for t in export(ls, project.id)}
        new = [i for i in items if comparison_key(i) not in held]
        if new:
            ls.projects.import_tasks(project.id, request=[{"data": i} for i in new], return_task_ids=True)
        return {"project": project.id, "created": created, "imported": len(new), "already_there": len(items) - len(new)}

    return _calling(url, run)


def export(ls, project_id: int) -> list:
    raw = b"".join(ls.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=True))
    return json.loads(raw)


def pull(url: str, project: str) -> tuple[list, dict]:
    """(the project's JSON export with every task, {user id: email}); project is an id or a title."""
    ls = client(url)

    def run():
        found = find_project(ls, project) if not str(project).isdigit() else ls.projects.get(int(project))
        if found is None:
            raise ConfigError(f"no Label Studio project titled {project!r} at {url}",
                              fix="give the project's id or exact title (`raydpo collect push` prints both)")
        names = {}
        try:
            names = {u.id: u.email for u in ls.users.list()}
        except Exception:  # an annotator's token may not list users: the summary then shows user ids
            pass
        return export(ls, found.id), names

    return _calling(url, run)
