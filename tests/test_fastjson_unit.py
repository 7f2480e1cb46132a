"""server/fastjson.py: orjson for every answer, the stdlib for what
orjson refuses, and parts of answers serialized once (fragments)."""
import json

from server import fastjson


def test_a_fragment_is_copied_into_the_answer_as_it_was_serialized():
    room = {'id': 7, 'name': 'café ☕', 'members': [1, 2]}
    answer = {'rooms': [{'room': fastjson.fragment(room), 'unread': 2}]}
    text = fastjson.dumps(answer)
    assert json.loads(text) == {'rooms': [{'room': room, 'unread': 2}]}
    assert fastjson.fragment(None) is None


def test_fragments_survive_the_stdlib_fallback():
    """An integer past 64 bits sends the answer to the stdlib encoder,
    which must write the fragments' values too."""
    big = 2 ** 70
    answer = {'n': big, 'last': fastjson.fragment({'body': 'hé', 'n': 1})}
    assert json.loads(fastjson.dumps(answer)) == {
        'n': big, 'last': {'body': 'hé', 'n': 1}}
    # And a fragment of something orjson refuses itself.
    assert json.loads(fastjson.dumps([fastjson.fragment({'n': big})])) == \
        [{'n': big}]
