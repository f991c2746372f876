#include "actors/curve_keys.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <zmq.h>

namespace grove::actors {
namespace {

constexpr size_t kZ85KeyChars = 40;

std::string Trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t start = 0;
  while (start < s.size() && std::isspace(static_cast<unsigned char>(s[start]))) ++start;
  return s.substr(start);
}

// Writes `text` to a new file of `mode`; O_EXCL so an existing file is never
// replaced and the mode holds from the first byte.
Status WriteNewFile(const std::string& path, const std::string& text, mode_t mode) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    if (errno == EEXIST) return Status::AlreadyExists(path + " exists; not overwriting a key");
    return Status::IOError("create " + path + ": " + std::strerror(errno));
  }
  const bool written = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  const bool synced = fsync(fd) == 0;
  close(fd);
  if (!written || !synced) return Status::IOError("write " + path + ": " + std::strerror(errno));
  return Status::OK();
}

}  // namespace

bool IsZ85Key(std::string_view text) {
  if (text.size() != kZ85KeyChars) return false;
  std::string copy(text);
  uint8_t decoded[32];
  return zmq_z85_decode(decoded, copy.c_str()) != nullptr;
}

Result<CurveKeyPair> GenerateCurveKeyPair() {
  if (!zmq_has("curve")) {
    return Status::FailedPrecondition("this libzmq was built without CURVE support");
  }
  char pub[kZ85KeyChars + 1], sec[kZ85KeyChars + 1];
  if (zmq_curve_keypair(pub, sec) != 0) {
    return Status::Internal(std::string("zmq_curve_keypair: ") + zmq_strerror(zmq_errno()));
  }
  return CurveKeyPair{pub, sec};
}

Result<std::string> CurvePublicKeyOf(const std::string& secret_key) {
  if (!IsZ85Key(secret_key)) return Status::InvalidArgument("not a 40-character Z85 key");
  char pub[kZ85KeyChars + 1];
  if (zmq_curve_public(pub, secret_key.c_str()) != 0) {
    return Status::Internal(std::string("zmq_curve_public: ") + zmq_strerror(zmq_errno()));
  }
  return std::string(pub);
}

Status WriteCurveKeyPair(const std::string& dir, const std::string& name, const CurveKeyPair& pair) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.') {
    return Status::InvalidArgument("key name '" + name + "' must be a plain file name");
  }
  if (!IsZ85Key(pair.public_key) || !IsZ85Key(pair.secret_key)) {
    return Status::InvalidArgument("key pair is not two 40-character Z85 keys");
  }
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) {
    std::filesystem::create_directories(dir, ec);
    if (ec) return Status::IOError("create " + dir + ": " + ec.message());
    std::filesystem::permissions(dir, std::filesystem::perms::owner_all, ec);
  }
  const std::string stem = (std::filesystem::path(dir) / name).string();
  GROVE_RETURN_IF_ERROR(WriteNewFile(stem + ".key", pair.secret_key + "\n", 0600));
  Status pub = WriteNewFile(stem + ".pub", pair.public_key + "\n", 0644);
  if (!pub.ok()) {
    std::remove((stem + ".key").c_str());  // no half-written pair left behind
    return pub;
  }
  return Status::OK();
}

Result<std::string> ReadCurveKeyFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot read key file " + path);
  std::ostringstream text;
  text << in.rdbuf();
  std::string key = Trim(text.str());
  if (!IsZ85Key(key)) {
    return Status::InvalidArgument(path + " does not hold a 40-character Z85 key (grove keygen writes them)");
  }
  return key;
}

Result<CurveKeyPair> ReadCurveKeyPair(const std::string& stem) {
  const std::string key_path = stem + ".key";
  struct stat st;
  if (stat(key_path.c_str(), &st) != 0) return Status::NotFound("no secret key file " + key_path);
  if ((st.st_mode & 077) != 0) {
    return Status::FailedPrecondition(key_path + " is readable by others; chmod 600 it");
  }
  CurveKeyPair pair;
  GROVE_ASSIGN_OR_RETURN(pair.secret_key, ReadCurveKeyFile(key_path));
  GROVE_ASSIGN_OR_RETURN(pair.public_key, CurvePublicKeyOf(pair.secret_key));
  if (std::filesystem::exists(stem + ".pub")) {
    GROVE_ASSIGN_OR_RETURN(std::string listed, ReadCurveKeyFile(stem + ".pub"));
    if (listed != pair.public_key) {
      return Status::InvalidArgument(stem + ".pub does not belong to " + key_path);
    }
  }
  return pair;
}

}  // namespace grove::actors
