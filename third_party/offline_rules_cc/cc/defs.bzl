"""Offline stand-in for @rules_cc//cc:defs.bzl: forwards to the native rules.

Bazel 4.2.3 (Debian's bazel-bootstrap) cannot download rules_cc without a
network, and Debian's bazel-rules-cc is too new for it. Users with network
access never see this file: ./configure only points rules_cc here offline.
"""

def cc_binary(**attrs):
    native.cc_binary(**attrs)

def cc_library(**attrs):
    native.cc_library(**attrs)

def cc_test(**attrs):
    native.cc_test(**attrs)

def cc_import(**attrs):
    native.cc_import(**attrs)

def cc_toolchain(**attrs):
    native.cc_toolchain(**attrs)

def cc_toolchain_suite(**attrs):
    native.cc_toolchain_suite(**attrs)

def cc_proto_library(**attrs):
    native.cc_proto_library(**attrs)

def objc_library(**attrs):
    native.objc_library(**attrs)
