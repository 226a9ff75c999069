"""The chat TUI driven by Pilot with a tiny real checkpoint (its answers are random-looking text)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import write_tiny_model
from tui_helpers import (close_welcome, isolated_home, make_app, open_settings, record_notes,  # noqa: F401 - autouse
                         wait_for, welcome_shown)

from mistral_chat.chat.store import ChatStore
from mistral_chat.tui.screens.chat import ChatScreen


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
        from textual.widgets import Input, TextArea

        settings = await open_settings(pilot)
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
        await close_welcome(pilot)
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
        await close_welcome(pilot)
        await pilot.pause()
        views = chat(app).chat_log.views
        assert views[0].text.startswith("[INST] hi [/INST]")
        svg = app.export_screenshot()
        assert "[INST]&#160;hi&#160;[/INST]" in svg or "[INST] hi [/INST]" in svg


async def test_no_model_shows_the_pull_command(tmp_path: Path) -> None:
    app = make_app(tmp_path / "chats.db", None)
    async with app.run_test(size=(100, 30)) as pilot:
        from mistral_chat.tui.screens.welcome import PULL_COMMAND

        await wait_for(pilot, lambda: welcome_shown(app), timeout=10, what="the welcome screen")
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
        await close_welcome(pilot)
        md = chat(app).export("markdown")
        js = chat(app).export("json")
    assert md is not None and md.parent == isolated_home / "exports"
    assert "**User:**\n\nhi" in md.read_text() and "Be kind." in md.read_text()
    data = json.loads(js.read_text())
    assert [m["content"] for m in data["messages"]] == ["hi", "hello"]


def test_settings_validation_of_sampling_fields_stop_strings_and_tools_file(tmp_path: Path) -> None:
    import json

    from mistral_chat.tui.screens.settings import format_stop_strings, parse_settings, parse_stop_strings

    base = {"temperature": "0", "top_p": "1", "top_k": "0", "max_tokens": "16", "seed": "", "min_p": "0",
            "repetition_penalty": "1", "presence_penalty": "0", "stop": "", "tools": ""}
    for field, value, message in [("min_p", "1.5", "min-p"), ("min_p", "x", "min-p must be a number"),
                                  ("repetition_penalty", "0", "repetition penalty"),
                                  ("presence_penalty", "lots", "presence penalty must be a number"),
                                  ("tools", str(tmp_path / "missing.json"), "cannot read tools file")]:
        with pytest.raises(ValueError, match=message):
            parse_settings("", {**base, field: value})
    (tmp_path / "bad.json").write_text("[{\"name\": \"has space\"}]")
    with pytest.raises(ValueError, match="function name"):
        parse_settings("", {**base, "tools": str(tmp_path / "bad.json")})
    (tmp_path / "tools.json").write_text(json.dumps([{"name": "get_weather", "parameters": {}}]))
    settings = parse_settings("", {**base, "min_p": "0.1", "repetition_penalty": "1.2", "presence_penalty": "0.5",
                                   "stop": "###, \\n\\nUser:,a\\,b\nEND", "tools": str(tmp_path / "tools.json")})
    g = settings.generation
    assert (g.min_p, g.repetition_penalty, g.presence_penalty) == (0.1, 1.2, 0.5)
    assert g.stop == ("###", "\n\nUser:", "a,b", "END")
    assert parse_stop_strings(format_stop_strings(g.stop)) == g.stop
    assert settings.tools_path == str((tmp_path / "tools.json").resolve())


# ---- function calling -------------------------------------------------------------------------------------------

WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def scripted_session_class():
    from mistral_chat.engine.generate import GenerationStats, Session

    class ScriptedSession(Session):
        """The real session, except that its first answers are given token ids (a random model never calls a
        tool): they go through the worker's real reading of calls. Every prompt and its parameters are kept."""

        def __init__(self, loaded, context_length, script: list[list[int]]) -> None:
            super().__init__(loaded, context_length=context_length)
            self.script = script
            self.prompts: list[tuple[list[int], object]] = []

        def generate(self, prompt_ids, params=None, cancel=None):
            self.prompts.append((list(prompt_ids), params))
            if not self.script:
                yield from super().generate(prompt_ids, params, cancel)
                return
            ids = self.script.pop(0)
            self.stats = GenerationStats(prompt_tokens=len(prompt_ids), generated_tokens=len(ids),
                                         finish_reason="stop")
            self.generated_ids = list(ids)
            yield self.loaded.tokenizer.decode(ids)

    return ScriptedSession


async def test_tool_call_then_pasted_result_then_the_model_goes_on(tiny_model: Path, tmp_path: Path) -> None:
    import json

    from textual.widgets import Input

    from mistral_chat.chat.conversation import Conversation
    from mistral_chat.chat.templates import encode_conversation
    from mistral_chat.chat.tools import ToolCall, encode_tool_calls, load_tools, tool_format
    from mistral_chat.text.tokenizer import load_tokenizer
    from mistral_chat.tui.widgets.tool_call_view import ToolCallView
    from mistral_chat.tui.widgets.tool_result_view import ToolResultView

    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(WEATHER_TOOLS))
    tokenizer = load_tokenizer(tiny_model)
    call = ToolCall("abcDEF123", "get_weather", '{"city": "[bold]Paris[/bold]"}')
    script = [[tokenizer.special_id("[TOOL_CALLS]"), *tokenizer.encode('[{"name": "get_weather", "arguments": {')],
              encode_tool_calls(tokenizer, tool_format(tokenizer), [call])]
    sessions = []

    def factory(loaded, context_length):
        sessions.append(scripted_session_class()(loaded, context_length, script))
        return sessions[-1]

    db = tmp_path / "chats.db"
    app = make_app(db, tiny_model, session_factory=factory)
    notes = record_notes(app)
    async with app.run_test(size=(100, 34)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        screen = chat(app)
        # the tools file and the new sampling fields, through the settings screen
        settings = await open_settings(pilot)
        settings.query_one("#tools", Input).value = str(tmp_path / "nope.json")
        settings.query_one("#min_p", Input).value = "0.05"
        settings.query_one("#stop", Input).value = "###, \\nUser:"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is settings and "cannot read tools file" in str(settings.query_one("#error").render())
        settings.query_one("#tools", Input).value = str(tools_file)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is screen
        conversation_id = screen.conversation.id
        stored = app.store.load(conversation_id)
        assert stored.tools_path == str(tools_file.resolve())
        assert (stored.settings.min_p, stored.settings.stop) == (0.05, ("###", "\nUser:"))

        # a malformed call: its raw text is the answer, and a notification says why
        await type_and_send(pilot, "Hi")
        await answered(pilot)
        view = screen.chat_log.last_view()
        assert not isinstance(view, ToolCallView) and view.text.startswith('[{"name": "get_weather"')
        assert any("not valid JSON" in n for n in notes)
        assert app.store.load(conversation_id).messages[-1].tool_calls == ()
        params = sessions[0].prompts[0][1]
        assert (params.min_p, params.stop) == (0.05, ("###", "\nUser:"))

        # a call: shown as data (name and indented JSON), saved with the answer; the prompt asks for its result
        await type_and_send(pilot, "Weather in Paris?")
        await answered(pilot)
        view = screen.chat_log.last_view()
        assert isinstance(view, ToolCallView) and view.calls == (call,)
        assert '"city": "[bold]Paris[/bold]"' in str(view.query_one(".call-arguments").render())
        assert "get_weather" in str(view.query_one(".call-name").render())
        assert app.store.load(conversation_id).messages[-1].tool_calls == (call,)
        assert screen.answering_call == call
        await pilot.press("escape")  # leave the result for later ...
        assert screen.answering_call is None
        await type_and_send(pilot, "Never mind")  # ... but a plain message waits for it
        await pilot.pause()
        assert len(app.store.load(conversation_id).messages) == 4
        assert any("waits for the result of get_weather" in n for n in notes)
        view.focus()
        await pilot.press("r")  # r on the call asks for its result again
        assert screen.answering_call == call and screen.prompt.has_focus
        await type_and_send(pilot, '{"temperature": 21}')
        await answered(pilot)

        messages = app.store.load(conversation_id).messages
        assert [m.role for m in messages] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
        assert (messages[4].tool_call_id, messages[4].name, messages[4].content) == \
            (call.id, "get_weather", '{"temperature": 21}')
        # the model went on from the result, with the tools in its prompt
        prompt_ids, _ = sessions[0].prompts[-1]
        answered_from = Conversation(conversation_id, messages=messages[:5]).chat_messages()
        assert prompt_ids == encode_conversation(tokenizer, answered_from, load_tools(tools_file))
        assert screen.status.info.trimmed_messages == 0
        assert sessions[0].stats.generated_tokens > 0 or sessions[0].stats.finish_reason == "stop"
        await pilot.press("ctrl+q")

    app = make_app(db, None)  # the next run shows the calls and results as they were
    async with app.run_test(size=(100, 34)) as pilot:
        await close_welcome(pilot)
        await pilot.pause()
        views = chat(app).chat_log.views
        assert [type(v).__name__ for v in views] == ["MessageView", "MessageView", "MessageView", "ToolCallView",
                                                     "ToolResultView", "MessageView"]
        assert views[3].calls == (call,) and isinstance(views[4], ToolResultView)
        assert chat(app).conversation.tools_path == str(tools_file.resolve())


async def test_tools_with_a_model_without_function_calling(tmp_path: Path) -> None:
    import json

    model = write_tiny_model(tmp_path / "v1", "mistral", tokenizer="v1")["native"]
    (tmp_path / "tools.json").write_text(json.dumps(WEATHER_TOOLS))
    db = tmp_path / "chats.db"
    store = ChatStore(db)
    store.create_conversation("With tools", tools_path=str(tmp_path / "tools.json"))
    store.close()
    app = make_app(db, model)
    notes = record_notes(app)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await type_and_send(pilot, "Weather?")
        await answered(pilot)
        assert any("no function calling" in n for n in notes), notes
        assert [m.role for m in app.store.load(chat(app).conversation.id).messages] == ["user", "assistant"]


async def test_view_follows_the_stream_unless_scrolled_up(tiny_model: Path, tmp_path: Path) -> None:
    from tui_helpers import SlowSession

    app = make_app(tmp_path / "chats.db", tiny_model,
                   session_factory=lambda loaded, ctx: SlowSession(loaded, ctx, delay=0.02, words=400))
    async with app.run_test(size=(80, 20)) as pilot:
        await wait_for(pilot, lambda: app.model_state == "ready", what="the model")
        await type_and_send(pilot, "Count")
        log = chat(app).chat_log
        await wait_for(pilot, lambda: log.max_scroll_y > 10, timeout=20, what="an answer taller than the view")
        await pilot.pause(0.3)
        assert log.at_end  # following the stream
        log.scroll_to(y=0, animate=False)
        await pilot.pause(0.1)
        grown = log.max_scroll_y
        await wait_for(pilot, lambda: log.max_scroll_y > grown + 5, timeout=20, what="more of the answer")
        assert log.scroll_y == 0  # the user scrolled up: the view stays where they put it
        await pilot.press("escape")
        await answered(pilot)


async def test_a_chat_left_waiting_for_a_tool_result_asks_for_it_when_opened(tmp_path: Path) -> None:
    from mistral_chat.chat.tools import ToolCall

    db = tmp_path / "chats.db"
    store = ChatStore(db)
    conversation = store.create_conversation("Weather")
    store.add_message(conversation.id, "user", "Weather in Paris?")
    call = ToolCall("abcDEF123", "get_weather", '{"city": "Paris"}')
    store.add_message(conversation.id, "assistant", "", tool_calls=(call,))
    store.close()
    app = make_app(db, None)
    async with app.run_test(size=(100, 30)) as pilot:
        await close_welcome(pilot)
        await pilot.pause()
        screen = chat(app)
        if screen.conversation is None or screen.conversation.id != conversation.id:
            await screen.open_conversation(conversation.id)
            await pilot.pause()
        assert screen.answering_call == call
        assert "get_weather" in str(screen.prompt.border_title)


async def test_a_message_view_takes_notes_and_text_before_compose_and_while_removed() -> None:
    """An answer may end before its view is composed, or while the chat log is shown again and the view's label and
    body are already gone: the note and text are kept (compose uses them), nothing raises."""
    from textual.app import App, ComposeResult
    from textual.widgets import Label

    from mistral_chat.tui.widgets.message_view import MessageView

    view = MessageView("assistant", "Hello")
    view.set_note("(stopped)")  # not composed yet

    class One(App):
        def compose(self) -> ComposeResult:
            yield view

    async with One().run_test():
        assert "(stopped)" in str(view.query_one(".role", Label).render())
        await view.remove_children()
        view.set_note("(cancelled)")
        await view.append(" there")
        await view.finish("Hello there!")
        assert (view.note, view.text, view.markdown) == ("(cancelled)", "Hello there!", None)
