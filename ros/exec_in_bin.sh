#!/bin/sh
# `ros2 run` and `ros2 launch` look for a package's executables in <prefix>/lib/<package>/, where
# colcon puts an ament_python package's console scripts; pip puts them in <prefix>/bin/. Every file in
# ros/lib/robomosaic/ links here and runs the console script of its own name from <prefix>/bin.
exec "$(dirname "$0")/../../bin/$(basename "$0")" "$@"
