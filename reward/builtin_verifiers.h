// The built-in verifiers, registered under these names in every
// VerifierRegistry (reference formats are the task's JSON reference text):
//   format     1 when the completion is <think>..</think><answer>..</answer>,
//              each tag once and in order; reference unused.
//   exact      1 when the answer equals the reference answer: "19", 19 or
//              {"answer": "19"}. Numbers compare as exact rationals, so 1/2,
//              0.5 and \boxed{0.5} agree; other text compares trimmed.
//   countdown  1 when the answer is an expression over + - * / and parens that
//              uses each of {"numbers":[ints]} at most once and evaluates,
//              exactly and without overflow, to "target".
//   symbolic   1 when the answer is algebraically equal to the reference
//              "expr" (a string in x, or {"expr": str, "vars": [str]}).
//   overlong   DAPO's soft overlong penalty for {"max_tokens": L, "buffer": B}:
//              0 up to L-B tokens, falling linearly to -1 at L, -1 beyond.
//              Tokens = the input's token_count, else characters.
//   python_tests, python_tests_all
//              run the completion's Python program on hidden stdin/stdout
//              tests in a bubblewrap sandbox (python_tests_verifier.h).
// Every one of them bounds its work on the answer and never throws.
#pragma once

#include <memory>

#include "reward/verifier.h"

namespace grove::reward {

std::unique_ptr<Verifier> MakeFormatVerifier();
std::unique_ptr<Verifier> MakeExactVerifier();
std::unique_ptr<Verifier> MakeCountdownVerifier();
std::unique_ptr<Verifier> MakeSymbolicVerifier();
std::unique_ptr<Verifier> MakeOverlongVerifier();

}  // namespace grove::reward
