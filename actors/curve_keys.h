// CurveZMQ key pairs and their files.
//
// A key is 32 bytes of Curve25519, written as 40 characters of Z85 text
// (ZeroMQ's encoding). On disk a key pair NAME is two files:
//   NAME.key  the secret key, one line of Z85, mode 0600 (never share it)
//   NAME.pub  the public key, one line of Z85 (give it to whoever must admit
//             or reach the owner)
// `grove keygen` writes them; docs/operations.md (security) gives the layout
// a cluster uses.
#pragma once

#include <string>
#include <string_view>

#include "base/result.h"

namespace grove::actors {

struct CurveKeyPair {
  std::string public_key;  // 40 Z85 characters
  std::string secret_key;  // 40 Z85 characters ("" when only the public half is known)
};

// True when `text` is 40 characters of the Z85 alphabet that decode to a
// 32-byte key.
bool IsZ85Key(std::string_view text);

// A fresh key pair from libzmq (FailedPrecondition if libzmq lacks CURVE).
Result<CurveKeyPair> GenerateCurveKeyPair();

// The public key belonging to a Z85 secret key.
Result<std::string> CurvePublicKeyOf(const std::string& secret_key);

// Writes DIR/NAME.key (0600, created so that it is never readable by others,
// even for a moment) and DIR/NAME.pub; creates DIR (0700) if missing.
// AlreadyExists rather than overwriting an existing NAME.key.
Status WriteCurveKeyPair(const std::string& dir, const std::string& name, const CurveKeyPair& pair);

// Reads a one-line Z85 key file (.pub or .key); InvalidArgument naming the
// file when its contents are not a key.
Result<std::string> ReadCurveKeyFile(const std::string& path);

// Reads STEM.key, derives the public key from it, and, when STEM.pub exists,
// checks that it matches (a mismatch means the files were mixed up).
// Refuses a secret key file that others can read (mode & 077).
Result<CurveKeyPair> ReadCurveKeyPair(const std::string& stem);

}  // namespace grove::actors
