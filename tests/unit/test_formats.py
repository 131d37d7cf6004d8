"""Record -> conversation converters: hand-written expected outputs per format, every error reason, column
mapping, train flags, content parts, and the real LLaMA-Factory data sets in ../shared/datasets."""

import json

import pytest

from sftdist.data.messages import FORMATS, ROLES, DataError, to_conversation, to_text

WHERE = "/data/x.jsonl: line 17"


def user(text):
    return {"role": "user", "content": text}


def bot(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# --- one expected output per format ----------------------------------------------------------------------

def test_messages_format_normalises_tool_calls_and_drops_extras():
    row = {"messages": [
        {"role": "system", "content": "Be brief.", "name": None},
        {"role": "user", "content": "Weather in Oslo?", "weight": 3},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "wx", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "-3C", "name": "wx", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is -3C."}]}
    messages, tools = to_conversation(row, "messages", WHERE)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        user("Weather in Oslo?"),
        bot("", tool_calls=[{**call("wx", {"city": "Oslo"}), "id": "c1"}]),
        {"role": "tool", "content": "-3C", "name": "wx", "tool_call_id": "c1"},
        bot("It is -3C.")]
    assert tools is None


def test_sharegpt_maps_roles_system_function_call_and_observation():
    row = {"system": "You can call tools.",
           "conversations": [{"from": "human", "value": "Add 2 and 3"},
                             {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
                             {"from": "observation", "value": '{"sum": 5}'},
                             {"from": "gpt", "value": "5"}],
           "tools": '[{"name": "add", "description": "a+b", "parameters": {"type": "object"}}]'}
    messages, tools = to_conversation(row, "sharegpt", WHERE)
    assert messages == [{"role": "system", "content": "You can call tools."}, user("Add 2 and 3"),
                        bot("", tool_calls=[call("add", {"a": 2, "b": 3})]),
                        {"role": "tool", "content": '{"sum": 5}'}, bot("5")]
    assert tools == [{"type": "function",
                      "function": {"name": "add", "description": "a+b", "parameters": {"type": "object"}}}]


def test_sharegpt_parallel_function_calls_and_system_turn():
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "function_call", "value": '[{"name": "f", "arguments": {}}, '
                                                                '{"name": "g", "arguments": "{\\"x\\": 1}"}]'}]}
    messages, _ = to_conversation(row, "sharegpt", WHERE)
    assert messages == [{"role": "system", "content": "S"}, user("Q"),
                        bot("", tool_calls=[call("f", {}), call("g", {"x": 1})])]


@pytest.mark.parametrize("row,expected", [
    ({"instruction": "Sum", "input": "2+2", "output": "4"}, [user("Sum\n\n2+2"), bot("4")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, [user("Say hi"), bot("hi")]),
    ({"instruction": "Say hi", "output": "hi"}, [user("Say hi"), bot("hi")]),
    ({"instruction": "", "input": "only input", "output": "ok"}, [user("only input"), bot("ok")]),
    ({"instruction": "And 3?", "input": None, "output": "3", "system": "Count.",
      "history": [["1?", "1"], ["2?", "2"]]},
     [{"role": "system", "content": "Count."}, user("1?"), bot("1"), user("2?"), bot("2"), user("And 3?"),
      bot("3")]),
])
def test_alpaca(row, expected):
    assert to_conversation(row, "alpaca", WHERE) == (expected, None)


def test_prompt_completion_strings_and_conversational():
    assert to_conversation({"prompt": "The sky is", "completion": " blue."}, "prompt_completion", WHERE) == (
        [user("The sky is"), bot(" blue.")], None)
    row = {"prompt": [{"role": "system", "content": "S"}, user("Hi")],
           "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}
    assert to_conversation(row, "prompt_completion", WHERE) == ([{"role": "system", "content": "S"}, user("Hi"),
                                                                  bot("Hello")], None)


def test_text_and_plain_messages():
    assert to_text({"text": "A document."}, WHERE) == "A document."
    row = {"messages": [user("Hi"), bot("Yo")]}
    assert to_conversation(row, "messages", WHERE)[0] == [user("Hi"), bot("Yo")]
    assert FORMATS == ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
    assert ROLES == ("system", "user", "assistant", "tool")


# --- content parts, flags, tools -------------------------------------------------------------------------

def test_content_parts_with_reasoning_and_tool_calls():
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Area of r=2? "}, {"type": "text", "text": "Thanks"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "Use the tool."},
            {"type": "tool_call", "value": '{"name": "area", "arguments": {"r": 2}}'},
            {"type": "tool_call", "value": {"name": "area", "arguments": '{"r": 3}'}}]},
        {"role": "tool", "content": [{"type": "text", "value": "12.57"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "About 12.57."},
                                          {"type": "reasoning", "value": "Round it."}]}]}
    messages, _ = to_conversation(row, "messages", WHERE)
    assert messages == [
        user("Area of r=2? Thanks"),
        bot("<think>\nUse the tool.\n</think>\n\n", tool_calls=[call("area", {"r": 2}), call("area", {"r": 3})]),
        {"role": "tool", "content": "12.57"},
        bot("<think>\nRound it.\n</think>\n\nAbout 12.57.")]


def test_content_parts_as_read_by_datasets_with_both_keys():
    # datasets unifies part schemas across a file: a part spelled with "value" also gets "text": None.
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": None, "value": "hi"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "yo", "value": None}]}]}
    assert to_conversation(row, "messages", WHERE)[0] == [user("hi"), bot("yo")]


@pytest.mark.parametrize("flags,expected", [
    ({}, None), ({"loss_weight": None, "train": None}, None),
    ({"loss_weight": 0.0}, False), ({"loss_weight": 1.0}, True), ({"loss_weight": 0}, False),
    ({"loss_weight": 1}, True), ({"train": False}, False), ({"train": True, "loss_weight": 1.0}, True),
])
def test_train_flag_only_when_record_sets_it(flags, expected):
    row = {"messages": [user("q"), {"role": "assistant", "content": "a", **flags}]}
    reply = to_conversation(row, "messages", WHERE)[0][1]
    assert reply.get("train") is expected and ("train" in reply) == (expected is not None)
    assert "loss_weight" not in reply


def test_train_flag_in_other_formats():
    row = {"conversations": [{"from": "human", "value": "q", "loss_weight": 0.0},
                             {"from": "gpt", "value": "a", "train": True}]}
    assert to_conversation(row, "sharegpt", WHERE)[0] == [{**user("q"), "train": False}, bot("a", train=True)]


@pytest.mark.parametrize("raw,expected", [
    (None, None), ("", None), ("[]", None), ([], None),
    ('[{"name": "f", "parameters": {}}]', [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ([{"type": "function", "function": {"name": "f"}}], [{"type": "function", "function": {"name": "f"}}]),
])
def test_tools_are_parsed_and_wrapped(raw, expected):
    row = {"messages": [user("q"), bot("a")], "tools": raw}
    assert to_conversation(row, "messages", WHERE)[1] == expected


# --- column mapping ---------------------------------------------------------------------------------------

def test_column_mapping_for_every_format():
    msgs = [user("q"), bot("a")]
    assert to_conversation({"conversation": msgs, "funcs": '[{"name": "f"}]'}, "messages", WHERE,
                           {"messages": "conversation", "tools": "funcs"}) == (
        msgs, [{"type": "function", "function": {"name": "f"}}])
    assert to_conversation({"question": "q", "answer": "a"}, "alpaca", WHERE,
                           {"instruction": "question", "output": "answer"})[0] == msgs
    assert to_conversation({"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                           "sharegpt", WHERE, {"conversations": "chat", "from": "role", "value": "content"})[0] == msgs
    assert to_conversation({"p": "q", "c": "a"}, "prompt_completion", WHERE,
                           {"prompt": "p", "completion": "c"})[0] == msgs
    assert to_text({"content": "doc"}, WHERE, {"text": "content"}) == "doc"
    with pytest.raises(DataError, match="'conversation'") as err:  # errors name the record's own key
        to_conversation({"messages": msgs}, "messages", WHERE, {"messages": "conversation"})
    assert err.value.reason == "missing_field"


# --- every error reason -----------------------------------------------------------------------------------

OK = [user("q"), bot("a")]


@pytest.mark.parametrize("row,fmt,reason,fragment", [
    ({"messages": OK}, "csv", "unknown_format", "unknown data format 'csv'"),
    ({"text": "doc"}, "text", "unknown_format", "use to_text"),
    ({"conversation": OK}, "messages", "missing_field", "non-empty 'messages'"),
    ({"messages": "hi"}, "messages", "missing_field", "non-empty 'messages' list, got str"),
    ({"messages": [{"content": "q"}, bot("a")]}, "messages", "missing_field", "message 0 has no 'role'"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing_field", "turn 0 needs 'from' and 'value'"),
    ({"output": "a"}, "alpaca", "missing_field", "missing field 'instruction'"),
    ({"instruction": "q"}, "alpaca", "missing_field", "missing field 'output'"),
    ({"prompt": "q"}, "prompt_completion", "missing_field", "missing field 'completion'"),
    ({"messages": [user("q"), {"role": "robot", "content": "x"}]}, "messages", "unknown_role",
     "message 1 has unknown role 'robot'"),
    ({"conversations": [{"from": "bard", "value": "x"}]}, "sharegpt", "unknown_role", "unknown role 'bard'"),
    ({"messages": []}, "messages", "empty_conversation", "non-empty 'messages'"),
    ({"conversations": []}, "sharegpt", "empty_conversation", "got an empty list"),
    ({"prompt": [], "completion": "a"}, "prompt_completion", "empty_conversation", "'prompt' is an empty list"),
    ({"messages": [user("only a question")]}, "messages", "no_assistant_turn", "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}]}, "sharegpt",
     "no_assistant_turn", "no assistant turn"),
    ({"prompt": "q", "completion": [user("not a reply")]}, "prompt_completion", "no_assistant_turn",
     "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, bot("a")]}, "messages", "non_string_content",
     "content must be a string"),
    ({"messages": [user("q"), {"role": "assistant", "content": [{"type": "image", "url": "x"}]}]}, "messages",
     "non_string_content", "part 0 has unsupported type 'image'"),
    ({"messages": [user("q"), {"role": "assistant", "content": [{"type": "text", "value": 5}]}]}, "messages",
     "non_string_content", "part 0 (text) must hold a string"),
    ({"conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]}, "sharegpt",
     "non_string_content", "turn 0 (human) 'value' must be a string, got list"),
    ({"messages": [user("q"), {"role": "assistant", "content": ["a"]}]}, "messages", "non_string_content",
     "message 1 part 0 must be an object"),
    ({"instruction": "q", "input": 7, "output": "a"}, "alpaca", "non_string_content", "'input' must be a string"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca", "non_string_content",
     "history[0] must be a [user, assistant] pair"),
    ({"messages": [user("q"), bot("a", loss_weight=0.5)]}, "messages", "bad_loss_weight",
     "loss_weight must be 0 or 1, got 0.5"),
    ({"messages": [user("q"), bot("a", loss_weight="1")]}, "messages", "bad_loss_weight", "loss_weight must be"),
    ({"messages": [user("q"), bot("a", train="yes")]}, "messages", "bad_loss_weight", "'train' must be"),
    ({"messages": [user("q"), bot("a", train=False, loss_weight=1.0)]}, "messages", "bad_loss_weight",
     "contradicts"),
    ({"messages": OK, "tools": "[{not json"}, "messages", "invalid_tools", "'tools' is not valid JSON"),
    ({"messages": OK, "tools": '{"name": "f"}'}, "messages", "invalid_tools", "must be a list"),
    ({"messages": [user("q"), bot("", tool_calls=[call("f", "{broken")])]}, "messages", "bad_tool_call",
     "arguments of tool call 'f' are not valid JSON"),
    ({"messages": [user("q"), bot("", tool_calls=[call("f", "[1, 2]")])]}, "messages", "bad_tool_call",
     "must be an object, got list"),
    ({"messages": [user("q"), bot("", tool_calls={"name": "f"})]}, "messages", "bad_tool_call",
     "'tool_calls' must be a list"),
    ({"messages": [user("q"), bot("", tool_calls=[{"arguments": {}}])]}, "messages", "bad_tool_call",
     "no function name"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [call("f", {})]}, bot("a")]}, "messages",
     "bad_tool_call", "only assistant messages can call tools"),
    ({"messages": [user("q"), {"role": "assistant", "content": [{"type": "tool_call", "value": "nope"}]}]},
     "messages", "bad_tool_call", "tool call is not valid JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
     "sharegpt", "bad_tool_call", "turn 1: tool call is not valid JSON"),
])
def test_error_reasons(row, fmt, reason, fragment):
    with pytest.raises(DataError) as err:
        to_conversation(row, fmt, WHERE)
    assert err.value.reason == reason
    assert str(err.value).startswith(WHERE + ":") or str(err.value).startswith(WHERE + " ")
    assert fragment in str(err.value)


@pytest.mark.parametrize("row,reason", [
    ({}, "missing_field"), ({"text": "   \n"}, "missing_field"), ({"text": ""}, "missing_field"),
    ({"text": ["a"]}, "non_string_content"), ({"text": 3}, "non_string_content"),
])
def test_to_text_errors(row, reason):
    with pytest.raises(DataError) as err:
        to_text(row, WHERE)
    assert err.value.reason == reason and str(err.value).startswith(f"{WHERE}: ")


def test_data_error_default_reason_and_is_value_error():
    e = DataError("f: bad")
    assert isinstance(e, ValueError) and e.reason == "invalid_record" and str(e) == "f: bad"


# --- the real data sets -----------------------------------------------------------------------------------

def load(shared_dir, name):
    path = shared_dir / "datasets" / name
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def convert_all(shared_dir, name, fmt):
    return [to_conversation(r, fmt, f"{name}: record {i}") for i, r in enumerate(load(shared_dir, name))]


def assert_well_formed(convs):
    for messages, tools in convs:
        assert messages and any(m["role"] == "assistant" for m in messages)
        for m in messages:
            assert m["role"] in ROLES and isinstance(m["content"], str)
            assert set(m) <= {"role", "content", "tool_calls", "name", "tool_call_id", "train"}
            for c in m.get("tool_calls", []):
                assert c["type"] == "function" and isinstance(c["function"]["arguments"], dict)
        assert tools is None or all(t["type"] == "function" and t["function"]["name"] for t in tools)


@pytest.mark.parametrize("name,count", [("llamafactory_alpaca_en_demo.json", 999), ("llamafactory_identity.json", 91)])
def test_alpaca_files(shared_dir, name, count):
    rows, convs = load(shared_dir, name), convert_all(shared_dir, name, "alpaca")
    assert len(convs) == count
    assert_well_formed(convs)
    for row, (messages, tools) in zip(rows, convs):
        prompt = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
        assert messages == [user(prompt), bot(row["output"])] and tools is None
    if name == "llamafactory_identity.json":
        assert "{{name}}" in convs[0][0][1]["content"]  # placeholders are the data's, kept verbatim


def test_glaive_toolcall_file(shared_dir):
    convs = convert_all(shared_dir, "llamafactory_glaive_toolcall_en_demo.json", "sharegpt")
    assert len(convs) == 300
    assert_well_formed(convs)
    messages, tools = convs[0]
    assert messages[3] == bot("", tool_calls=[call("search_recipes",
                                                   {"ingredients": ["chicken", "bell peppers", "rice"]})])
    assert messages[4]["role"] == "tool" and json.loads(messages[4]["content"])["recipes"]
    assert [t["function"]["name"] for t in tools] == ["search_recipes"]
    assert sum(tools is None for _, tools in convs) == 109  # records with tools "[]"
    assert sum(len(m.get("tool_calls", [])) for ms, _ in convs for m in ms) == 211


def test_kto_file_as_messages(shared_dir):
    convs = convert_all(shared_dir, "llamafactory_kto_en_demo.json", "messages")
    assert len(convs) == 300
    assert_well_formed(convs)
    assert all(ms[-1]["role"] == "assistant" and "train" not in ms[-1] for ms, _ in convs)


def test_v1_sft_file_content_parts_and_loss_weight(shared_dir):
    convs = convert_all(shared_dir, "llamafactory_v1_sft_demo.jsonl", "messages")
    assert len(convs) == 500
    assert_well_formed(convs)
    assert convs[0] == ([{**user("hi"), "train": False},
                         bot("Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                             "How can I assist you today?", train=True)], None)
    assert all([m["train"] for m in ms] == [False, True] for ms, _ in convs)


def test_reason_tool_use_file(shared_dir):
    convs = convert_all(shared_dir, "llamafactory_reason_tool_use_demo_50.jsonl", "messages")
    assert len(convs) == 50
    assert_well_formed(convs)
    messages, tools = convs[1]
    assert messages[2]["content"].startswith("<think>\nAlright, the user wants information about the movie")
    assert messages[2]["content"].endswith("\n</think>\n\n")
    assert messages[2]["tool_calls"] == [call("get_movie_details", {"title": "Inception"})]
    assert messages[3]["role"] == "tool" and '"Inception"' in messages[3]["content"]
    assert "get_movie_details" in [t["function"]["name"] for t in tools]
    assert [i for i, (_, tools) in enumerate(convs) if not tools] == [36, 48]  # tools "[]", no tool calls
    calls = [len(m.get("tool_calls", [])) for ms, _ in convs for m in ms]
    assert max(calls) == 3 and sum(calls) == 41 + 9 * 2 + 3 * 3


def test_text_files(shared_dir):
    docs = [to_text(r, f"c4: line {i + 1}") for i, r in enumerate(load(shared_dir, "llamafactory_c4_demo.jsonl"))]
    assert len(docs) == 300 and docs[0].startswith("Don\u2019t think you need all the bells and whistles?")
    lines = (shared_dir / "datasets" / "llamafactory_wiki_demo.txt").read_text().splitlines()
    wiki = [to_text({"text": line}, f"wiki: line {i + 1}") for i, line in enumerate(lines) if line.strip()]
    assert len(wiki) == 30 and min(map(len, wiki)) > 900


# --- rendering with a real chat template ----------------------------------------------------------------

# Written for this test: reads tools, tool calls (name + arguments as a mapping) and tool results, the way
# tool-aware templates do, so a converter that left arguments as strings or misshaped calls would show.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}"
    "{% for k, v in c.function.arguments.items() %} {{ k }}={{ v | tojson }}{% endfor %}</call>{% endfor %}\n"
    "{% endfor %}")


@pytest.fixture(scope="module")
def qwen2(shared_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "qwen2")


@pytest.mark.parametrize("name,fmt", [("llamafactory_glaive_toolcall_en_demo.json", "sharegpt"),
                                      ("llamafactory_reason_tool_use_demo_50.jsonl", "messages")])
def test_tool_conversations_render_with_qwen2(shared_dir, qwen2, name, fmt):
    for messages, tools in convert_all(shared_dir, name, fmt):
        text = qwen2.apply_chat_template(messages, tools=tools, tokenize=False)
        assert messages[-1]["content"] in text
        text = qwen2.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=TOOL_TEMPLATE)
        for m in messages:
            for c in m.get("tool_calls", []):
                assert f"<call>{c['function']['name']}" in text
        assert tools is None or text.startswith("TOOLS: " + tools[0]["function"]["name"])


def test_tool_call_arguments_render_as_json_objects(shared_dir, qwen2):
    messages, tools = convert_all(shared_dir, "llamafactory_glaive_toolcall_en_demo.json", "sharegpt")[0]
    text = qwen2.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=TOOL_TEMPLATE)
    assert '[assistant]<call>search_recipes ingredients=["chicken", "bell peppers", "rice"]</call>' in text
