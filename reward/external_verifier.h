// A verifier that is an external program, in any language.
//
// Protocol: the program reads one JSON object per line on stdin,
//   {"prompt": str, "completion": str, "reference": <the reference JSON value,
//    or a string when it is not JSON>, "token_count": int}
// and writes one JSON object per line on stdout, in the same order,
//   {"reward": number, "reason": str, "scores": {name: number}}   (reason, scores optional)
// Text that is not valid UTF-8 is sent with U+FFFD in place of bad bytes. The
// program's stderr is passed through. It is started on first use (in the
// process that scores, so each pool worker has its own), runs in its own
// process group, and dies with that process. A reply later than `timeout`
// kills the group; the sample gets 0 ("timed out") and the next request
// starts a fresh program. A garbage reply costs the sample 0 as well.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "reward/verifier.h"

namespace grove::reward {

struct ExternalVerifierOptions {
  std::string command;  // run with /bin/sh -c
  std::chrono::milliseconds timeout{2000};
  size_t max_reply_bytes = 1 << 20;
};

std::unique_ptr<Verifier> MakeExternalVerifier(ExternalVerifierOptions options);

}  // namespace grove::reward
