// Exports the plug-in symbols with an ABI version no grove has, so the loader
// must refuse it.
#include "reward/verifier.h"

extern "C" __attribute__((visibility("default"))) int grove_verifier_abi_version() { return 9990; }
extern "C" __attribute__((visibility("default"))) const char* grove_verifier_name() { return "from_the_future"; }
extern "C" __attribute__((visibility("default"))) grove::reward::Verifier* grove_verifier_create() { return nullptr; }
extern "C" __attribute__((visibility("default"))) void grove_verifier_destroy(grove::reward::Verifier*) {}
