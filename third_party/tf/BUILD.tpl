package(default_visibility = ["//visibility:public"])

cc_library(
    name = "tf_header_lib",
    hdrs = glob(["include/**"], exclude = ["include/external/**/*.py"]),
    includes = ["include"],
)

cc_library(
    name = "libtensorflow_framework",
    srcs = ["%{TF_SHARED_LIBRARY_NAME}"],
)
