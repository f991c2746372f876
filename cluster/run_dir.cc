#include "cluster/run_dir.h"

#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>

namespace grove {

namespace fs = std::filesystem;

Result<std::string> CreateRunDir(const std::string& runs_root, const std::string& name) {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", &tm);
  std::string base = name + "-" + stamp;
  std::error_code ec;
  fs::path dir = fs::path(runs_root) / base;
  for (int n = 2; fs::exists(dir, ec); ++n) dir = fs::path(runs_root) / (base + "-" + std::to_string(n));
  fs::create_directories(dir / "logs", ec);
  if (ec) return Status::IOError("cannot create " + (dir / "logs").string() + ": " + ec.message());
  fs::path latest = fs::path(runs_root) / "latest";
  fs::path tmp = fs::path(runs_root) / ".latest.tmp";
  fs::remove(tmp, ec);
  fs::create_directory_symlink(dir.filename(), tmp, ec);
  if (!ec) fs::rename(tmp, latest, ec);  // atomic replace of the link
  if (ec) return Status::IOError("cannot point " + latest.string() + " at the run: " + ec.message());
  return fs::absolute(dir).string();
}

Status WriteJsonAtomically(const std::string& path, const nlohmann::json& value) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << value.dump(2) << "\n";
    if (!out) return Status::IOError("cannot write " + tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Status::IOError("cannot rename " + tmp + ": " + ec.message());
  return Status::OK();
}

Result<nlohmann::json> ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::NotFound("cannot read " + path);
  try {
    return nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    return Status::Corruption(path + " is not valid JSON: " + e.what());
  }
}

Result<std::string> FindRunDir(const std::string& explicit_dir) {
  std::string dir = explicit_dir;
  if (dir.empty()) {
    const char* env = std::getenv("GROVE_RUN_DIR");
    dir = env != nullptr && *env != '\0' ? env : "runs/latest";
  }
  std::error_code ec;
  if (!fs::exists(fs::path(dir) / "cluster.json", ec)) {
    return Status::NotFound("no cluster found: " + dir +
                            "/cluster.json does not exist (start one with `grove up`, or pass "
                            "--coordinator tcp://HOST:PORT or set GROVE_RUN_DIR)");
  }
  return fs::canonical(dir, ec).string();
}

Result<std::string> FindCoordinator(const std::string& flag, const std::string& run_dir_flag) {
  if (!flag.empty()) {
    if (flag.rfind("tcp://", 0) != 0 && flag.rfind("ipc://", 0) != 0) {
      return Status::InvalidArgument("--coordinator wants tcp://HOST:PORT, got '" + flag + "'");
    }
    return flag;
  }
  GROVE_ASSIGN_OR_RETURN(std::string dir, FindRunDir(run_dir_flag));
  GROVE_ASSIGN_OR_RETURN(nlohmann::json info, ReadJsonFile(dir + "/cluster.json"));
  if (!info.contains("coordinator") || !info["coordinator"].is_string()) {
    return Status::Corruption(dir + "/cluster.json names no coordinator");
  }
  return info["coordinator"].get<std::string>();
}

}  // namespace grove
