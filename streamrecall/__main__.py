from streamrecall.ops.cli import main

main()
