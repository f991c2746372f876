// replay_audit: reads a stopped run's replay store and says, for the group
// ids given on stdin (one "ID [VERSION]" per line), which are stored, which
// are still unsettled (neither consumed nor dropped), and which are missing.
// Prints one JSON object on stdout; the chaos run (chaos_run.py) holds it
// against the rollout workers' acknowledgement logs and the learner's
// consumed.jsonl. Opens the store read-write (RocksDB has no shared lock), so
// the run must be stopped; never creates one.
//
//   replay_audit RUN_DIR/replay < ids.txt
#include <iostream>
#include <set>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "replay/group_store.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: replay_audit STORE_DIR < ids\n";
    return 2;
  }
  grove::replay::GroupStoreOptions options;
  options.path = argv[1];
  options.create_if_missing = false;
  auto store = grove::replay::GroupStore::Open(options);
  if (!store.ok()) {
    std::cerr << "replay_audit: " << store.status() << "\n";
    return 1;
  }
  std::set<std::string> unsettled;
  grove::Status walked = (*store)->ForEachUnsettled(
      [&](const grove::replay::UnsettledGroup& g) { unsettled.insert(g.group_id); });
  if (!walked.ok()) {
    std::cerr << "replay_audit: " << walked << "\n";
    return 1;
  }
  nlohmann::json missing = nlohmann::json::array(), pending = nlohmann::json::array();
  uint64_t asked = 0, stored = 0;
  std::set<std::string> seen;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream fields(line);
    std::string id;
    if (!(fields >> id) || !seen.insert(id).second) continue;
    ++asked;
    auto key = (*store)->Find(id);
    if (!key.ok()) {
      std::cerr << "replay_audit: " << key.status() << "\n";
      return 1;
    }
    if (!key->has_value()) {
      missing.push_back(id);
      continue;
    }
    ++stored;
    if (unsettled.count(id) != 0) pending.push_back(id);
  }
  const grove::replay::StoreCounters c = (*store)->Counters();
  nlohmann::json out = {{"asked", asked},
                        {"stored", stored},
                        {"missing", missing},
                        {"unsettled", pending},
                        {"unsettled_total", unsettled.size()},
                        {"counters",
                         {{"stored", c.stored},
                          {"consumed", c.consumed},
                          {"dropped_stale", c.dropped_stale},
                          {"retention_floor", c.retention_floor}}}};
  std::cout << out.dump() << "\n";
  return 0;
}
