// Prometheus text exposition (format 0.0.4) of a cluster's status, the JSON
// `grove status --json` prints (cluster/status_view.h). Every figure is a
// gauge (counters an actor heartbeats may fall when it restarts) but the
// latency summaries:
//
//   grove_coordinator_uptime_seconds               the coordinator's uptime
//   grove_cluster_<name>                           each numeric cluster field
//                                                  (learner_step, staleness,
//                                                  prompt_queue_depth, reward_mean, ...)
//   grove_cluster_actors{state}                    actors per state (all six states)
//   grove_actor_state{role,id,state}               1 for the actor's state, 0 for the others
//   grove_actor_heartbeat_age_seconds{role,id}     and _uptime_seconds, _restarts,
//   grove_actor_rss_bytes, grove_actor_policy_version, grove_actor_pid
//   grove_<role>_<counter>{role,id}                each counter the actor heartbeats
//                                                  (grove_rollout_tokens_per_s, ...)
//   grove_<role>_<base>_seconds{role,id,quantile}  a summary for each latency window an
//                                                  actor heartbeats (actors/latency_window.h),
//                                                  with _sum and _count (e.g.
//                                                  grove_verifier_reward_latency_seconds)
//
// Names are reduced to [a-zA-Z0-9_] (anything else becomes '_'); label
// values are escaped (\\, \", \n).
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace grove {

std::string RenderPrometheus(const nlohmann::json& status);

// "tokens/s" -> "tokens_s"; a leading digit gets a '_' in front.
std::string PrometheusName(const std::string& name);

}  // namespace grove
