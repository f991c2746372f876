#!/usr/bin/env python3
"""Example plug-in, kind (c): an external verifier program (standard library only).

grove writes one JSON request per line on stdin:
  {"prompt": str, "completion": str, "reference": any, "token_count": int}
and reads one JSON reply per line on stdout, in the same order:
  {"reward": number, "reason": str, "scores": {name: number}}

This one scores 1 when the <answer> text (trimmed, lower-cased) is one of
reference["accept"], e.g. {"accept": ["4", "four"]}. Use it with:
  grove verify --external 'answer_in_set=python3 examples/verifiers/external/answer_in_set.py' \
               --verifiers format:0.1,answer_in_set:1 --input samples.jsonl
"""
import json
import re
import sys

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def score(request):
    reference = request.get("reference")
    if not isinstance(reference, dict) or not isinstance(reference.get("accept"), list):
        return {"reward": 0.0, "reason": 'reference must be {"accept": [str]}'}
    completion = request.get("completion", "")
    after_think = completion.rsplit("</think>", 1)[-1]
    answers = ANSWER.findall(after_think)
    if len(answers) != 1:
        return {"reward": 0.0, "reason": "need exactly one <answer> block"}
    got = answers[0].strip().lower()
    accepted = {str(a).strip().lower() for a in reference["accept"]}
    hit = got in accepted
    return {"reward": 1.0 if hit else 0.0, "reason": "ok" if hit else "not accepted",
            "scores": {"answer_chars": len(got)}}


def main():
    for line in sys.stdin:
        try:
            reply = score(json.loads(line))
        except Exception as error:  # a bad request must not end the stream
            reply = {"reward": 0.0, "reason": "bad request: %s" % type(error).__name__}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
