// `grove verify`: scores a JSONL file offline, to try verifiers before a run.
//
//   grove verify --verifiers format:0.1,exact:1 --input samples.jsonl
//                [--plugin lib.so]... [--external NAME=COMMAND]...
//                [--workers N] [--timeout_ms MS] [--external_timeout_ms MS]
//
// Input lines: {"prompt": str, "completion": str, "reference": any JSON,
// "token_count": int (optional)}; "-" reads stdin. Output, one line per input
// line on stdout in the same order: {"reward": number, "reason": str,
// "scores": {name: number}}. A malformed input line gets reward 0 with the
// reason. A summary goes to stderr. Returns 0 when every line was scored, 1
// when some input line was malformed, 2 on a usage or setup error.
#pragma once

namespace grove::reward {

int VerifyMain(int argc, char** argv);

}  // namespace grove::reward
