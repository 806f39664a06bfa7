return KvmSharp.Images.Tool.ImgCommand.Run(args, Console.Out, Console.Error);
