"""The chat TUI driven by Pilot with a tiny real checkpoint (its answers are random-looking text)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import write_tiny_model
from tui_helpers import isolated_home, make_app, wait_for  # noqa: F401 - an autouse fixture

from mistral_chat.chat.store import ChatStore
from mistral_chat.tui.screens.chat import ChatScreen
from mistral_chat.tui.widgets.message_view import MessageView


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "mistral")["native"]


def chat(app) -> ChatScreen:
    return app.chat


async def type_and_send(pilot, text: str) -> None:
    prompt = chat(pilot.app).prompt
    prompt.focus()
    prompt.load_text(text)
    await pilot.press("enter")


async def answered(pilot) -> None:
    await wait_for(pilot, lambda: chat(pilot.app).streaming is None, what="the answer to end")


async def test_send_and_stream_an_answer(tiny_model: Path, tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", tiny_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await type_and_send(pilot, "Hello [bold]model[/bold]")
        await wait_for(pilot, lambda: chat(app).streaming is not None or chat(app).status.info.tokens_per_second
                       is not None, what="the answer to start")
        await answered(pilot)
        views = chat(app).chat_log.views
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[0].text == "Hello [bold]model[/bold]"
        assert views[1].text  # 12 random tokens
        stored = app.store.load(chat(app).conversation.id)
        assert [m.role for m in stored.messages] == ["user", "assistant"]
        assert stored.messages[1].content == views[1].text
        assert stored.title == "Hello [bold]model[/bold]"
        info = chat(app).status.info
        assert info.context_used > 0 and info.context_length == 256 and info.tokens_per_second is not None


async def test_stop_keeps_the_partial_answer_and_saves_while_streaming(tiny_model: Path, tmp_path: Path) -> None:
    from tui_helpers import SlowSession

    db = tmp_path / "chats.db"
    app = make_app(db, tiny_model, session_factory=lambda loaded, ctx: SlowSession(loaded, ctx))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await type_and_send(pilot, "Count")
        screen = chat(app)
        conversation_id = screen.conversation.id
        # the answer is saved while it streams (at least every second), from another connection's view
        other = ChatStore(db)

        def saved_partial() -> bool:
            messages = other.load(conversation_id).messages
            return len(messages) == 2 and messages[1].content.startswith("word0")

        await wait_for(pilot, saved_partial, timeout=10, what="the partial answer on disk")
        await pilot.press("escape")
        await answered(pilot)
        view = screen.chat_log.last_view("assistant")
        assert view is not None and "(stopped)" in str(view.note)
        assert view.text.startswith("word0 word1") and "word199" not in view.text
        assert other.load(conversation_id).messages[1].content == view.text
        other.close()


async def test_regenerate_and_edit_and_resend(tiny_model: Path, tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", tiny_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        screen = chat(app)
        await type_and_send(pilot, "First question")
        await answered(pilot)
        first_answer = screen.conversation.messages[-1]
        await pilot.press("ctrl+r")
        await answered(pilot)
        messages = app.store.load(screen.conversation.id).messages
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[1].id != first_answer.id
        assert len(screen.chat_log.views) == 2

        await pilot.press("ctrl+l")
        assert screen.prompt.text == "First question"
        screen.prompt.load_text("Better question")
        await pilot.press("enter")
        await answered(pilot)
        messages = app.store.load(screen.conversation.id).messages
        assert [(m.role, m.content) for m in messages][0] == ("user", "Better question")
        assert len(messages) == 2
        assert [v.text for v in screen.chat_log.views][0] == "Better question"
        # the follow-up reuses the cache: only the new turn is prefilled
        await type_and_send(pilot, "And a follow-up")
        await answered(pilot)
        stats = app.engine.session.stats
        assert stats.prefilled_tokens < stats.prompt_tokens


async def test_switch_and_delete_conversations(tiny_model: Path, tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", tiny_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        screen = chat(app)
        await type_and_send(pilot, "Chat one")
        await answered(pilot)
        first_id = screen.conversation.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert screen.conversation.id != first_id and not screen.chat_log.views
        await type_and_send(pilot, "Chat two")
        await answered(pilot)
        second_id = screen.conversation.id
        titles = [c.title for c in app.store.list_conversations()]
        assert titles == ["Chat two", "Chat one"]
        # open the first one from the sidebar
        await screen.sidebar.show(app.store.list_conversations(), second_id)
        screen.sidebar.post_message(screen.sidebar.Selected(first_id))
        await wait_for(pilot, lambda: screen.conversation.id == first_id, what="the switch")
        assert screen.chat_log.views[0].text == "Chat one"
        # search
        await pilot.press("ctrl+f")
        await pilot.press(*"two")
        await pilot.pause()
        from mistral_chat.tui.widgets.sidebar import ConversationItem

        assert [i.conversation_id for i in screen.sidebar.query(ConversationItem)] == [second_id]
        # delete the open one (F8, then confirm)
        screen.prompt.focus()
        await pilot.press("f8")
        await pilot.pause()
        await pilot.press("y")
        await wait_for(pilot, lambda: screen.conversation.id != first_id, what="the deletion")
        assert app.store.load(first_id) is None
        assert [c.id for c in app.store.list_conversations()] == [second_id]


async def test_settings_change_is_saved_and_used(tiny_model: Path, tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", tiny_model)
    async with app.run_test(size=(100, 34)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        screen = chat(app)
        await pilot.press("ctrl+s")
        await pilot.pause()
        from textual.widgets import Input, TextArea

        settings = app.screen
        settings.query_one("#system_prompt", TextArea).load_text("Answer in French.")
        settings.query_one("#max_tokens", Input).value = "3"
        settings.query_one("#temperature", Input).value = "hot"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is settings and "temperature" in str(settings.query_one("#error").render())
        settings.query_one("#temperature", Input).value = "0.7"
        settings.query_one("#seed", Input).value = "42"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is screen
        stored = app.store.load(screen.conversation.id)
        assert stored.system_prompt == "Answer in French."
        assert (stored.settings.max_tokens, stored.settings.temperature, stored.settings.seed) == (3, 0.7, 42)
        await type_and_send(pilot, "Bonjour")
        await answered(pilot)
        assert app.engine.session.stats.generated_tokens <= 3


async def test_theme_switch_persists(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        assert {"mistral-dark", "mistral-light", "midnight", "paper"} <= set(app.available_themes)
        assert app.theme == "mistral-dark"
        await pilot.press("escape")  # the welcome screen
        app.theme = "mistral-light"
        await pilot.pause()
    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.theme == "mistral-light"


async def test_user_theme_folder_and_bad_theme(tmp_path: Path) -> None:
    from tui_helpers import REPO_THEMES

    user = tmp_path / "themes"
    user.mkdir()
    (user / "mine.toml").write_text('name = "mine"\nprimary = "#123456"\ndark = true\n')
    (user / "broken.toml").write_text('name = "broken"\nprimary = "not a colour"\n')
    app = make_app(tmp_path / "chats.db", None)
    app.options.theme_dirs = [REPO_THEMES, user]
    async with app.run_test(size=(100, 30)):
        assert "mine" in app.available_themes and "broken" not in app.available_themes
        assert any("broken.toml" in p for p in app.theme_problems)


async def test_persistence_across_two_runs(tiny_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    app = make_app(db, tiny_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await type_and_send(pilot, "Remember me")
        await answered(pilot)
        answer = chat(app).chat_log.views[-1].text
        await pilot.press("ctrl+q")
    app = make_app(db, tiny_model)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        views = chat(app).chat_log.views
        assert [v.text for v in views] == ["Remember me", answer]
        assert str(chat(app).chat_log.border_title) == "Remember me"


async def test_history_is_trimmed_at_a_tiny_context(tiny_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    store = ChatStore(db)
    conversation = store.create_conversation("Long one", system_prompt="Be brief.")
    for i in range(10):
        store.add_message(conversation.id, "user", f"question {i} " * 4)
        store.add_message(conversation.id, "assistant", f"answer {i} " * 4)
    store.close()
    app = make_app(db, tiny_model, context=64, max_tokens=8)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await type_and_send(pilot, "last one")
        await answered(pilot)
        info = chat(app).status.info
        assert info.trimmed_messages > 0 and info.context_length == 64
        notes = [n.message for n in app._notifications]
        assert any("left out of the prompt" in n for n in notes)
        assert len(chat(app).chat_log.views) == 22  # everything stays on screen and on disk


async def test_model_text_is_data_not_markup(tmp_path: Path) -> None:
    db = tmp_path / "chats.db"
    store = ChatStore(db)
    conversation = store.create_conversation("[bold]Markup[/bold] title [/INST]")
    store.add_message(conversation.id, "user", "[INST] hi [/INST] [bold]not bold[/bold] [link=x]")
    store.add_message(conversation.id, "assistant", "[/INST] [red]x[/] [bold]\n\n```\n[bold]code[/]\n```\n")
    store.close()
    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("escape")
        await pilot.pause()
        views = chat(app).chat_log.views
        assert views[0].text.startswith("[INST] hi [/INST]")
        svg = app.export_screenshot()
        assert "[INST]&#160;hi&#160;[/INST]" in svg or "[INST] hi [/INST]" in svg


async def test_no_model_shows_the_pull_command(tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        from mistral_chat.tui.screens.welcome import PULL_COMMAND, WelcomeScreen

        assert isinstance(app.screen, WelcomeScreen)
        assert PULL_COMMAND in str(app.screen.query_one("#welcome-text").render())
        await pilot.press("escape")
        await type_and_send(pilot, "anyone there?")
        await pilot.pause()
        assert chat(app).streaming is None
        assert app.store.load(chat(app).conversation.id).messages[0].content == "anyone there?"


async def test_export_markdown_and_json(tmp_path: Path, isolated_home: Path) -> None:
    import json

    db = tmp_path / "chats.db"
    store = ChatStore(db)
    conversation = store.create_conversation("Export me", system_prompt="Be kind.")
    store.add_message(conversation.id, "user", "hi")
    store.add_message(conversation.id, "assistant", "hello")
    store.close()
    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("escape")
        md = chat(app).export("markdown")
        js = chat(app).export("json")
    assert md is not None and md.parent == isolated_home / "exports"
    assert "**User:**\n\nhi" in md.read_text() and "Be kind." in md.read_text()
    data = json.loads(js.read_text())
    assert [m["content"] for m in data["messages"]] == ["hi", "hello"]
