// A minimal HTTP/1.0 GET for the ops tests (no HTTP library in the build).
#pragma once

#include <string>

namespace grove::testing {

// GETs http://HOST:PORT/path (url may omit "http://"); returns the whole
// response (status line, headers, body), "" when the connection fails.
std::string HttpGet(const std::string& url, const std::string& method = "GET");
// The body of a response ("" when it has none) and its status code.
std::string HttpBody(const std::string& response);
int HttpCode(const std::string& response);

}  // namespace grove::testing
