#include "base/config.h"

#include <fstream>
#include <optional>
#include <sstream>

#include <toml++/toml.h>

namespace grove {

struct Config::Impl {
  toml::table root;
  std::string source = "<string>";
};

namespace {

// Keys with a control character or a single quote (possible in quoted TOML
// keys and in --set keys) are refused: no grove key has one, and toml++
// writes such a key back in a form that does not parse (a literal string
// with the raw control character; a bare key with the quote), so ToToml's
// output -- the config file `grove up` hands every actor -- was unreadable.
bool HasUnwritableKeyChar(std::string_view key) {
  for (unsigned char c : key) {
    if (c < 0x20 || c == 0x7f || c == '\'') return true;
  }
  return false;
}

// True when toml++ writes `value` back as text that parses to the same
// string. It does not always: a string starting with a newline is written as
// a multi-line literal, whose first newline TOML drops (found by fuzzing).
bool StringRoundTrips(const std::string& value) {
  toml::table t;
  t.insert("v", value);
  std::ostringstream out;
  out << t;
  try {
    toml::table back = toml::parse(out.str());
    const std::optional<std::string> v = back["v"].value<std::string>();
    return v.has_value() && *v == value;
  } catch (const toml::parse_error&) {
    return false;
  }
}

// True when `s` is well-formed UTF-8 (no overlong forms, surrogates or code
// points above U+10FFFF). toml++ checks files itself; Override's text is
// checked here, since toml++ would write raw bytes back as other characters.
bool IsUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int extra = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : -1;
    if (extra < 0 || s.size() - i <= static_cast<size_t>(extra)) return false;
    uint32_t cp = extra == 0 ? c : c & (0x3f >> extra);
    for (int k = 1; k <= extra; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += static_cast<size_t>(extra) + 1;
  }
  return true;
}

// Every key and string value of `node` can be written back by ToToml.
Status CheckWritable(const toml::node& node, const std::string& source, const std::string& path) {
  if (const toml::value<std::string>* str = node.as_string()) {
    if (!StringRoundTrips(str->get()))
      return Status::InvalidArgument(source + ": the string at '" + path +
                                     "' cannot be written back as TOML unchanged (e.g. it starts with a newline)");
  } else if (const toml::table* t = node.as_table()) {
    for (const auto& [key, child] : *t) {
      const std::string full = path.empty() ? std::string(key.str()) : path + "." + std::string(key.str());
      if (HasUnwritableKeyChar(key.str()))
        return Status::InvalidArgument(source + ": key '" + full + "' contains a control character or a '");
      GROVE_RETURN_IF_ERROR(CheckWritable(child, source, full));
    }
  } else if (const toml::array* a = node.as_array()) {
    for (const toml::node& item : *a) GROVE_RETURN_IF_ERROR(CheckWritable(item, source, path));
  }
  return Status::OK();
}

std::string Join(std::string_view prefix, std::string_view path) {
  if (prefix.empty()) return std::string(path);
  if (path.empty()) return std::string(prefix);
  return std::string(prefix) + "." + std::string(path);
}

const toml::node* Find(const toml::table& root, std::string_view full_path) {
  if (full_path.empty()) return &root;
  return root.at_path(full_path).node();
}

std::string TypeName(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::table: return "table";
    case toml::node_type::array: return "array";
    case toml::node_type::string: return "string";
    case toml::node_type::integer: return "integer";
    case toml::node_type::floating_point: return "float";
    case toml::node_type::boolean: return "boolean";
    default: return "date/time";
  }
}

Status WrongType(const std::string& source, const std::string& path, const toml::node& n,
                 std::string_view want) {
  return Status::InvalidArgument(source + ": '" + path + "' must be " + std::string(want) +
                                 ", found " + TypeName(n));
}

Status Missing(const std::string& source, const std::string& path) {
  return Status::NotFound(source + ": required key '" + path + "' is missing");
}

template <typename T, typename Convert>
Result<T> Get(const toml::table& root, const std::string& source, const std::string& path,
              std::optional<T> fallback, std::string_view want, Convert convert) {
  const toml::node* n = Find(root, path);
  if (n == nullptr) {
    if (fallback) return std::move(*fallback);
    return Missing(source, path);
  }
  std::optional<T> v = convert(*n);
  if (!v) return WrongType(source, path, *n, want);
  return std::move(*v);
}

std::optional<int64_t> AsInt(const toml::node& n) { return n.value_exact<int64_t>(); }
std::optional<double> AsDouble(const toml::node& n) {
  if (auto d = n.value_exact<double>()) return d;
  if (auto i = n.value_exact<int64_t>()) return static_cast<double>(*i);
  return std::nullopt;
}
std::optional<bool> AsBool(const toml::node& n) { return n.value_exact<bool>(); }
std::optional<std::string> AsString(const toml::node& n) { return n.value_exact<std::string>(); }

template <typename T, typename Elem>
std::optional<std::vector<T>> AsList(const toml::node& n, Elem elem) {
  const toml::array* a = n.as_array();
  if (a == nullptr) return std::nullopt;
  std::vector<T> out;
  for (const toml::node& e : *a) {
    std::optional<T> v = elem(e);
    if (!v) return std::nullopt;
    out.push_back(std::move(*v));
  }
  return out;
}

}  // namespace

Config::Config() : impl_(std::make_shared<Impl>()) {}
Config::~Config() = default;
Config::Config(const Config&) = default;
Config& Config::operator=(const Config&) = default;
Config::Config(Config&&) noexcept = default;
Config& Config::operator=(Config&&) noexcept = default;

Result<Config> Config::Parse(std::string_view text, std::string source_name) {
  // Debian's toml++ is built with exceptions: a parse error throws.
  Config c;
  try {
    c.impl_->root = toml::parse(text, source_name);
  } catch (const toml::parse_error& err) {
    std::ostringstream msg;
    msg << source_name << ":" << err.source().begin.line << ":" << err.source().begin.column
        << ": " << err.description();
    return Status::InvalidArgument(msg.str());
  }
  GROVE_RETURN_IF_ERROR(CheckWritable(c.impl_->root, source_name, ""));
  c.impl_->source = std::move(source_name);
  return c;
}

Result<Config> Config::LoadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound("cannot open config file '" + path + "'");
  std::ostringstream buf;
  buf << in.rdbuf();
  return Parse(buf.str(), path);
}

bool Config::Has(std::string_view path) const {
  return Find(impl_->root, Join(prefix_, path)) != nullptr;
}

Result<int64_t> Config::Int(std::string_view path, std::optional<int64_t> fallback) const {
  return Get<int64_t>(impl_->root, impl_->source, Join(prefix_, path), fallback, "an integer", AsInt);
}
Result<double> Config::Double(std::string_view path, std::optional<double> fallback) const {
  return Get<double>(impl_->root, impl_->source, Join(prefix_, path), fallback, "a number", AsDouble);
}
Result<bool> Config::Bool(std::string_view path, std::optional<bool> fallback) const {
  return Get<bool>(impl_->root, impl_->source, Join(prefix_, path), fallback, "true or false", AsBool);
}
Result<std::string> Config::String(std::string_view path, std::optional<std::string> fallback) const {
  return Get<std::string>(impl_->root, impl_->source, Join(prefix_, path), std::move(fallback), "a string", AsString);
}
Result<std::vector<int64_t>> Config::IntList(std::string_view path,
                                             std::optional<std::vector<int64_t>> fallback) const {
  return Get<std::vector<int64_t>>(impl_->root, impl_->source, Join(prefix_, path), std::move(fallback),
                                   "an array of integers",
                                   [](const toml::node& n) { return AsList<int64_t>(n, AsInt); });
}
Result<std::vector<double>> Config::DoubleList(std::string_view path,
                                               std::optional<std::vector<double>> fallback) const {
  return Get<std::vector<double>>(impl_->root, impl_->source, Join(prefix_, path), std::move(fallback),
                                  "an array of numbers",
                                  [](const toml::node& n) { return AsList<double>(n, AsDouble); });
}
Result<std::vector<std::string>> Config::StringList(
    std::string_view path, std::optional<std::vector<std::string>> fallback) const {
  return Get<std::vector<std::string>>(
      impl_->root, impl_->source, Join(prefix_, path), std::move(fallback), "an array of strings",
      [](const toml::node& n) { return AsList<std::string>(n, AsString); });
}

Config Config::Section(std::string_view path) const {
  Config c = *this;
  c.prefix_ = Join(prefix_, path);
  return c;
}

Result<std::vector<Config>> Config::TableArray(std::string_view path) const {
  std::string full = Join(prefix_, path);
  const toml::node* n = Find(impl_->root, full);
  std::vector<Config> out;
  if (n == nullptr) return out;
  const toml::array* a = n->as_array();
  if (a == nullptr || !a->is_array_of_tables())
    return WrongType(impl_->source, full, *n, "an array of tables ([[" + full + "]])");
  for (size_t i = 0; i < a->size(); ++i) {
    Config c = *this;
    c.prefix_ = full + "[" + std::to_string(i) + "]";
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<std::string> Config::Keys() const {
  std::vector<std::string> keys;
  const toml::node* n = Find(impl_->root, prefix_);
  if (n == nullptr || !n->is_table()) return keys;
  for (const auto& [k, v] : *n->as_table()) keys.emplace_back(k.str());
  return keys;
}

Status Config::CheckKeys(const std::vector<std::string_view>& allowed) const {
  for (const std::string& k : Keys()) {
    bool known = false;
    for (std::string_view a : allowed) known = known || a == k;
    if (!known) {
      std::string list;
      for (std::string_view a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
      return Status::InvalidArgument(impl_->source + ": unknown key '" + Join(prefix_, k) +
                                     "' (known keys here: " + list + ")");
    }
  }
  return Status::OK();
}

Status Config::Override(std::string_view assignment) {
  size_t eq = assignment.find('=');
  if (eq == std::string_view::npos || eq == 0)
    return Status::InvalidArgument("override '" + std::string(assignment) + "' is not KEY=VALUE");
  std::string key = Join(prefix_, assignment.substr(0, eq));
  if (HasUnwritableKeyChar(key))
    return Status::InvalidArgument("override key contains a control character or a '");
  if (!IsUtf8(assignment)) return Status::InvalidArgument("override is not valid UTF-8");
  std::string value(assignment.substr(eq + 1));
  toml::table holder;
  try {
    holder = toml::parse("v = " + value);
  } catch (const toml::parse_error&) {
    holder.insert("v", value);  // a bare word: take it as a string
  }
  GROVE_RETURN_IF_ERROR(CheckWritable(*holder.get("v"), "override", key));
  // Copy-on-write: a Config copied earlier keeps its own values.
  impl_ = std::make_shared<Impl>(*impl_);
  toml::table* t = &impl_->root;
  size_t start = 0;
  while (true) {
    size_t dot = key.find('.', start);
    std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (part.empty()) return Status::InvalidArgument("override key '" + key + "' has an empty part");
    if (dot == std::string::npos) {
      t->insert_or_assign(part, *holder.get("v"));
      return Status::OK();
    }
    toml::node* child = t->get(part);
    if (child == nullptr) {
      t->insert(part, toml::table{});
      child = t->get(part);
    }
    if (!child->is_table())
      return Status::InvalidArgument("override '" + key + "': '" + part + "' is not a table");
    t = child->as_table();
    start = dot + 1;
  }
}

std::string Config::ToToml() const {
  std::ostringstream out;
  const toml::node* n = Find(impl_->root, prefix_);
  if (n != nullptr && n->is_table()) out << *n->as_table();
  return out.str();
}

const std::string& Config::source() const { return impl_->source; }

}  // namespace grove
