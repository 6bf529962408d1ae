"""Repository rule exposing the pip-installed TensorFlow to Bazel.

The configure script writes TF_HEADER_DIR, TF_SHARED_LIBRARY_DIR and
TF_SHARED_LIBRARY_NAME (all taken from tf.sysconfig) into .tf_configure.bazelrc.
Symlinks, not copies: the TF include tree holds tens of thousands of headers.
"""

_TF_HEADER_DIR = "TF_HEADER_DIR"
_TF_SHARED_LIBRARY_DIR = "TF_SHARED_LIBRARY_DIR"
_TF_SHARED_LIBRARY_NAME = "TF_SHARED_LIBRARY_NAME"

def _fail(msg):
    fail("\n%sConfiguration error:%s %s\nRun ./configure first.\n" % ("\033[0;31m", "\033[0m", msg))

def _get_env(repository_ctx, name):
    value = repository_ctx.os.environ.get(name)
    if not value:
        _fail("environment variable %s is not set" % name)
    return value

def _tf_configure_impl(repository_ctx):
    header_dir = _get_env(repository_ctx, _TF_HEADER_DIR)
    lib_dir = _get_env(repository_ctx, _TF_SHARED_LIBRARY_DIR)
    lib_name = _get_env(repository_ctx, _TF_SHARED_LIBRARY_NAME)
    if not repository_ctx.path(header_dir + "/tensorflow/core/framework/op.h").exists:
        _fail("%s=%s does not hold the TensorFlow headers" % (_TF_HEADER_DIR, header_dir))
    lib_path = lib_dir + "/" + lib_name
    if not repository_ctx.path(lib_path).exists:
        _fail("%s does not exist" % lib_path)
    repository_ctx.symlink(header_dir, "include")
    repository_ctx.symlink(lib_path, lib_name)
    repository_ctx.template(
        "BUILD",
        Label("//third_party/tf:BUILD.tpl"),
        {"%{TF_SHARED_LIBRARY_NAME}": lib_name},
    )

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = [_TF_HEADER_DIR, _TF_SHARED_LIBRARY_DIR, _TF_SHARED_LIBRARY_NAME],
    local = True,
)
