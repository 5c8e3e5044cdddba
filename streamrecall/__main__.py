from streamrecall.cli import main

main()
